"""Agent spec loading and the built-in tools."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentbus.agent_runner.specs import AgentSpecError, load_agent_specs
from agentbus.agent_runner.tools import BUILTIN_TOOLS, ToolCatalog, ToolInputError, calculator, word_count
from agentbus.runtime.tool_registry import load_tool_definitions

REPO_AGENTS = Path(__file__).resolve().parents[3] / "agents"
REPO_TOOLS = Path(__file__).resolve().parents[3] / "tools"
GOOD = "name: a\nmodel: scripted\nsystem_prompt: hi\ntools: [calculator]\nmax_steps: 3\n"


def _write(tmp_path: Path, text: str, name: str = "a.yaml") -> Path:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_the_shipped_agent_specs_load_with_the_shipped_tools() -> None:
    catalog = ToolCatalog({name: d.spec() for name, d in load_tool_definitions(REPO_TOOLS).items()})
    specs = load_agent_specs(REPO_AGENTS, catalog.names)
    assert {"assistant", "echo", "ops", "deploy-assistant", "support"} <= set(specs)
    with pytest.raises(AgentSpecError, match="unknown tool 'render_manifest'"):
        load_agent_specs(REPO_AGENTS, set(BUILTIN_TOOLS))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("max_steps: 3", "max_steps: 0"), "field 'max_steps'"),
        (GOOD.replace("model: scripted", "model: has.dot"), "field 'model'"),
        (GOOD.replace("tools: [calculator]", "tools: [calculator, nuke]"), "field 'tools[1]': unknown tool 'nuke'"),
        (GOOD + "budget_usd: -1\n", "field 'budget_usd'"),
        (GOOD + "surprise: 1\n", "field 'surprise'"),
        (GOOD.replace("system_prompt: hi\n", ""), "field 'system_prompt'"),
        ("name: [unclosed", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_a_bad_spec_names_the_file_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(AgentSpecError) as info:
        load_agent_specs(_write(tmp_path, text, "broken.yaml"), set(BUILTIN_TOOLS))
    assert "broken.yaml" in str(info.value)
    assert expected in str(info.value)


def test_two_specs_with_one_name_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "one.yaml")
    _write(tmp_path, GOOD, "two.yaml")
    with pytest.raises(AgentSpecError, match="defined twice"):
        load_agent_specs(tmp_path, set(BUILTIN_TOOLS))


def test_an_empty_or_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentSpecError, match="no agent spec"):
        load_agent_specs(tmp_path, set(BUILTIN_TOOLS))
    with pytest.raises(AgentSpecError, match="does not exist"):
        load_agent_specs(tmp_path / "missing", set(BUILTIN_TOOLS))


@pytest.mark.parametrize(("expression", "value"), [("(2+3)*4", "20"), ("7/2", "3.5"), ("-2**3", "-8"), ("10//3", "3")])
def test_calculator_evaluates_arithmetic(expression: str, value: str) -> None:
    assert calculator({"expression": expression}) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "2**100000", "1/0", "x+1", "", "[1]"])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ToolInputError):
        calculator({"expression": expression})


def test_word_count() -> None:
    assert word_count({"text": "to be or not to be"}) == "6"
    with pytest.raises(ToolInputError):
        word_count({"text": 3})
