"""MCP tool server files (`kind: mcp`): the tools they declare, their risk and approval, and how a bad file names
itself and its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from agentbus.runtime.tool_registry import (
    McpServerDefinition,
    McpToolHints,
    Risk,
    ToolDefinitionError,
    distinct_tools,
    load_mcp_servers,
    load_tool_definition,
    load_tool_definitions,
    load_tool_file,
    mcp_tool_risk,
)

REPO_TOOLS = Path(__file__).resolve().parents[3] / "tools"

SERVER = """
name: tickets
kind: mcp
transport: {type: stdio, command: "{python}", args: [server.py], secret_env: {API_TOKEN: TICKETS_TOKEN}}
timeout_seconds: 12
defaults:
  approval: {policy: always, reason: every call is looked at}
tools:
  search:
    description: Search tickets.
    parameters: {type: object, properties: {q: {type: string}}, required: [q]}
    annotations: {readOnlyHint: true}
    approval: {policy: never}
    idempotent: true
  delete-ticket:
    description: Delete a ticket.
    parameters: {type: object, properties: {id: {type: string}}}
    annotations: {destructiveHint: true}
    timeout_seconds: 3
  note:
    description: Add a note.
    parameters: {type: object}
    alias: add_note
    risk: low
"""


def _write(folder: Path, text: str, name: str = "tickets.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_the_sample_helpdesk_server_offers_its_tools_under_both_names() -> None:
    tools = load_tool_definitions(REPO_TOOLS)
    opened = tools["helpdesk.open_ticket"]
    assert tools["helpdesk__open_ticket"] is opened
    assert (opened.kind, opened.reference, opened.spec().name) == (
        "mcp",
        "helpdesk.open_ticket",
        "helpdesk__open_ticket",
    )
    assert opened.mcp is not None
    assert (opened.mcp.server, opened.mcp.tool) == ("helpdesk", "open_ticket")
    risks = {d.name: d.risk for d in distinct_tools(tools) if d.kind == "mcp"}
    assert risks == {"helpdesk__open_ticket": "medium", "helpdesk__get_ticket": "low", "helpdesk__close_ticket": "high"}
    assert tools["helpdesk.close_ticket"].approval.policy == "always"
    assert not opened.rerun_safe, "opening a ticket twice opens two"
    assert tools["helpdesk.close_ticket"].rerun_safe


def test_each_tool_takes_its_own_settings_then_the_servers_defaults(tmp_path: Path) -> None:
    _write(tmp_path, SERVER)
    tools = load_tool_definitions(tmp_path)
    assert sorted(tools) == [
        "add_note",
        "tickets.delete-ticket",
        "tickets.note",
        "tickets.search",
        "tickets__delete_ticket",
        "tickets__search",
    ]
    search, delete, note = tools["tickets.search"], tools["tickets.delete-ticket"], tools["tickets.note"]
    assert (search.approval.policy, delete.approval.policy, note.approval.policy) == ("never", "always", "always")
    assert (search.risk, delete.risk, note.risk) == ("low", "high", "low")
    assert (search.timeout_seconds, delete.timeout_seconds) == (12, 3)
    assert (search.rerun_safe, delete.rerun_safe) == (True, False), "not idempotent unless declared"
    assert note.name == "add_note"
    assert delete.field("approval.rules[0].when") == "defaults.approval.rules[0].when"
    assert search.field("approval.rules[0].when") == "tools.search.approval.rules[0].when"
    assert delete.field("parameters") == "tools.delete-ticket.parameters"


def test_only_the_exposed_tools_are_offered(tmp_path: Path) -> None:
    _write(tmp_path, SERVER + "expose: [search]\n")
    assert sorted(load_tool_definitions(tmp_path)) == ["tickets.search", "tickets__search"]
    [server] = load_mcp_servers(tmp_path).values()
    assert server.exposed == ["search"]


@pytest.mark.parametrize(
    ("declared", "hints", "risk"),
    [
        (None, None, "high"),
        (None, {"readOnlyHint": True}, "low"),
        (None, {"destructiveHint": False}, "medium"),
        (None, {"destructiveHint": True}, "high"),
        ("low", {"destructiveHint": True}, "high"),
        ("medium", {"readOnlyHint": True}, "medium"),
        ("critical", {"readOnlyHint": True}, "critical"),
        ("critical", {"destructiveHint": True}, "critical"),
        ("low", None, "low"),
    ],
)
def test_annotations_set_a_default_risk_and_never_lower_a_declared_one(
    declared: Risk | None, hints: dict[str, bool] | None, risk: Risk
) -> None:
    annotations = McpToolHints.model_validate(hints) if hints is not None else None
    assert mcp_tool_risk(declared, annotations) == risk


def test_a_server_file_is_one_file_of_the_tools_folder_not_one_tool(tmp_path: Path) -> None:
    path = _write(tmp_path, SERVER)
    assert isinstance(load_tool_file(path), McpServerDefinition)
    with pytest.raises(ToolDefinitionError, match="is a tool server"):
        load_tool_definition(path)


def _edited(**changes: object) -> str:
    document = yaml.safe_load(SERVER)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = document
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return yaml.safe_dump(document)


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (_edited(name="tick ets"), "name", "pattern"),
        (_edited(name="a__b"), "name", "pattern"),
        (_edited(transport={"type": "carrier-pigeon"}), "transport", "tag"),
        (_edited(transport={"type": "streamable-http", "url": "ftp://x"}), "transport.streamable-http.url", "pattern"),
        (_edited(transport__env={"NOT A NAME": "x"}), "transport.stdio.env", "environment variable"),
        (_edited(defaults__approval=None), "defaults.approval", "required"),
        (_edited(defaults__approval={"policy": "rules"}), "defaults.approval", "at least one rule"),
        (_edited(expose=["search", "nope"]), "(top level)", "expose names ['nope']"),
        (_edited(tools={}), "tools", "at least 1"),
        (_edited(tools__search__parameters={"type": "string"}), "tools.search.parameters", "type 'object'"),
        (_edited(tools__search__alias="9lives"), "tools.search.alias", "pattern"),
        (_edited(tools__search__risk="extreme"), "tools.search.risk", "Input should be"),
        (_edited(timeout_seconds=0), "timeout_seconds", "greater"),
    ],
)
def test_a_bad_server_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ToolDefinitionError) as raised:
        load_tool_definitions(tmp_path)
    assert str(raised.value).startswith(f"{path}: field '{field}'"), raised.value
    assert message in str(raised.value)


def test_a_name_the_model_cannot_take_asks_for_an_alias(tmp_path: Path) -> None:
    long_name = "t" * 70
    path = _write(
        tmp_path,
        _edited(tools={long_name: {"description": "d", "parameters": {"type": "object"}}}),
    )
    with pytest.raises(
        ToolDefinitionError, match=rf"{path}: field 'tools\.{long_name}\.alias'.*give the tool an alias"
    ):
        load_tool_definitions(tmp_path)


def test_a_tool_name_given_twice_is_refused_naming_both_files(tmp_path: Path) -> None:
    _write(tmp_path, SERVER, "a.yaml")
    _write(
        tmp_path,
        "name: add_note\ndescription: d\nkind: shell\nparameters: {type: object}\nshell: {command: [echo]}\n",
        "b.yaml",
    )
    with pytest.raises(
        ToolDefinitionError, match=r"b\.yaml: field 'name': tool 'add_note' is already defined in .*a\.yaml"
    ):
        load_tool_definitions(tmp_path)
    (tmp_path / "b.yaml").unlink()
    _write(tmp_path, SERVER, "c.yaml")
    with pytest.raises(ToolDefinitionError, match=r"c\.yaml: field 'name': tool server 'tickets' is already defined"):
        load_mcp_servers(tmp_path)
