"""Agents name MCP tools `<server>.<tool>`: the runner resolves them against the tools folder at start-up, offers
them to the model by their model-facing name, and stops on a name no tool server declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentbus.agent_runner.specs import AgentSpecError, load_agent_specs
from agentbus.agent_runner.tools import ToolCatalog
from agentbus.runtime.tool_registry import load_tool_definitions
from helpers import REPO_ROOT

HELPDESK = """
name: helpdesk
model: scripted
system_prompt: Help.
tools: [{tools}]
"""


def _catalog() -> ToolCatalog:
    return ToolCatalog({name: d.spec() for name, d in load_tool_definitions(REPO_ROOT / "tools").items()})


def test_the_sample_helpdesk_agent_is_offered_its_mcp_tools_by_their_model_names() -> None:
    catalog = _catalog()
    agents = load_agent_specs(REPO_ROOT / "agents", catalog.names)
    offered = [spec.name for spec in catalog.specs(agents["helpdesk"].tools)]
    assert offered == ["helpdesk__open_ticket", "helpdesk__get_ticket", "helpdesk__close_ticket"]


def test_an_agent_naming_an_unknown_mcp_tool_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "helpdesk.yaml"
    path.write_text(HELPDESK.format(tools="helpdesk.get_ticket, helpdesk.reopen_ticket"))
    with pytest.raises(AgentSpecError) as raised:
        load_agent_specs(tmp_path, _catalog().names)
    assert str(raised.value).startswith(f"{path}: field 'tools[1]': unknown tool 'helpdesk.reopen_ticket'")
