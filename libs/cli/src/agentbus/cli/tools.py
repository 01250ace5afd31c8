"""`agentbus tools list`: every tool an agent may name, with where it comes from, its risk and its approval policy.

It reads the tools folder as the tool-executor does (tool files and MCP tool server files) and adds the
agent-runner's built-in tools. It connects to nothing: an MCP server's live tool list is the executor's to follow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
from agentbus.cli.suite import DEFAULT_TOOLS_DIR

if TYPE_CHECKING:  # loaded by the commands that read tools, not by every `agentbus` invocation
    from agentbus.runtime.tool_registry import McpServerDefinition, ToolDefinition

BUILT_IN = "built-in (agent-runner)"
NOT_APPLICABLE = "-"


@dataclass(frozen=True)
class ToolRow:
    """One tool as `tools list` shows it."""

    name: str
    """The name the model calls it by."""
    spec_name: str
    """How an agent spec names it (`<server>.<tool>` for an MCP tool)."""
    source: str
    risk: str
    approval: str
    rerun_safe: bool | None


def describe_approval(definition: ToolDefinition) -> str:
    """A tool's approval policy in a few words: never, always, or the conditions of its rules."""
    approval = definition.approval
    if approval.policy == "rules":
        return "rules: " + " | ".join(rule.when for rule in approval.rules)
    return approval.policy


def describe_source(definition: ToolDefinition, servers: dict[str, McpServerDefinition]) -> str:
    """Where a tool comes from: its kind and file, or for an MCP tool its server, tool, transport and file."""
    from agentbus.runtime.tool_registry import McpStdioTransport

    if definition.mcp is not None:
        server = servers[definition.mcp.server]
        transport = "stdio" if isinstance(server.transport, McpStdioTransport) else server.transport.url
        return f"mcp {definition.mcp.server}/{definition.mcp.tool} ({transport}, {definition.source})"
    return f"{definition.kind} ({definition.source})"


def tool_rows(tools_dir: Path) -> list[ToolRow]:
    """Every tool of the tools folder, then the runner's own. Raises ToolDefinitionError naming the file and field."""
    from agentbus.agent_runner.tools import BUILTIN_TOOLS, MEMORY_TOOL_SPECS
    from agentbus.runtime.tool_registry import distinct_tools, load_mcp_servers, load_tool_definitions

    definitions = load_tool_definitions(tools_dir)
    servers = load_mcp_servers(tools_dir)
    rows = [
        ToolRow(
            definition.name,
            definition.reference,
            describe_source(definition, servers),
            definition.risk,
            describe_approval(definition),
            definition.rerun_safe,
        )
        for definition in distinct_tools(definitions)
    ]
    builtin = sorted([*BUILTIN_TOOLS, *MEMORY_TOOL_SPECS])
    rows += [ToolRow(name, name, BUILT_IN, NOT_APPLICABLE, "never", None) for name in builtin]
    return rows


def format_rows(rows: list[ToolRow]) -> str:
    """The rows as a fixed-width table."""
    header = ("TOOL", "AGENT SPEC NAME", "SOURCE", "RISK", "RERUN", "APPROVAL")
    cells = [
        (
            row.name,
            row.spec_name,
            row.source,
            row.risk,
            NOT_APPLICABLE if row.rerun_safe is None else ("yes" if row.rerun_safe else "no"),
            row.approval,
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)), line[-1]]).rstrip()
        for line in [header, *cells]
    )


@click.group("tools")
def tools_group() -> None:
    """The tools agents may name: the tools folder's (MCP tool servers' too) and the runner's built-in ones."""


@tools_group.command("list")
@click.option("--tools-dir", type=click.Path(path_type=Path), default=DEFAULT_TOOLS_DIR, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tool instead of a table.")
def list_command(tools_dir: Path, as_json: bool) -> None:
    """Every tool with its source (kind and file, or MCP server, tool and transport), risk and approval policy.

    RERUN says whether a call interrupted by a crash runs again (the tool is idempotent) or ends
    `execution_interrupted`. It reads files only: an MCP server's live tool list is the executor's to follow.
    """
    from agentbus.runtime.tool_registry import ToolDefinitionError

    try:
        rows = tool_rows(tools_dir)
    except ToolDefinitionError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from exc
    if as_json:
        for row in rows:
            click.echo(json.dumps(asdict(row), sort_keys=True))
    else:
        click.echo(format_rows(rows))
