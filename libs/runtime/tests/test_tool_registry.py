"""Tool definition files: what loads, and how a bad file names itself and its field."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.tool_registry import ToolDefinitionError, load_tool_definition, load_tool_definitions

REPO_TOOLS = Path(__file__).resolve().parents[3] / "tools"

GOOD = """
name: lookup
description: Look something up.
kind: http
parameters:
  type: object
  properties: {id: {type: string}}
  required: [id]
http:
  method: GET
  url: https://example.invalid/items/{id}
  headers:
    Authorization: {secret_env: LOOKUP_TOKEN, prefix: "Bearer "}
  send_idempotency_key: true
"""


def _write(tmp_path: Path, text: str, name: str = "tool.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_repository_tools_load_and_offer_their_schema() -> None:
    tools = load_tool_definitions(REPO_TOOLS)
    assert {"create_ticket", "run_shell", "render_manifest", "kubectl_apply", "search_knowledge_base"} <= set(tools)
    spec = tools["create_ticket"].spec()
    assert spec.name == "create_ticket"
    assert spec.parameters["required"] == ["title"]
    assert tools["create_ticket"].source == REPO_TOOLS / "create_ticket.yaml"


def test_a_good_file_loads_with_defaults(tmp_path: Path) -> None:
    definition = load_tool_definition(_write(tmp_path, GOOD))
    assert definition.approval.policy == "never"
    assert definition.approval.expires_after_seconds == 24 * 3600
    assert definition.timeout_seconds == 30
    assert definition.rerun_safe, "an http tool sending an idempotency key may run again"


@pytest.mark.parametrize(
    ("text", "kind", "safe"),
    [
        ("kind: shell\nshell: {command: [echo]}", "shell", False),
        ("kind: retrieval", "retrieval", True),
        ("kind: python\npython: {callable: 'a.b:c'}", "python", False),
        ("kind: python\npython: {callable: 'a.b:c', transactional: true}", "python", True),
        ("kind: shell\nidempotent: true\nshell: {command: [echo]}", "shell", True),
        ("kind: http\nhttp: {url: 'http://x'}", "http", False),
    ],
)
def test_rerun_safety_defaults_by_kind(tmp_path: Path, text: str, kind: str, safe: bool) -> None:
    head = "name: t\ndescription: d\nparameters: {type: object}\n"
    definition = load_tool_definition(_write(tmp_path, head + text))
    assert definition.kind == kind
    assert definition.rerun_safe is safe


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (GOOD.replace("kind: http", "kind: http\ncolour: red"), "colour", "Extra inputs"),
        (GOOD.replace("kind: http", "kind: ftp"), "kind", "Input should be"),
        (GOOD.replace("name: lookup", "name: 'look up'"), "name", "pattern"),
        (GOOD.replace("type: object", "type: objekt"), "parameters", "not a valid JSON Schema"),
        (GOOD.replace("type: object", "type: string"), "parameters", "type 'object'"),
        (GOOD.replace("kind: http", "kind: shell"), "(top level)", "needs a 'shell' block"),
        (GOOD + "python: {callable: 'a:b'}\n", "(top level)", "takes no 'python' block"),
        (GOOD + "approval: {policy: rules}\n", "approval", "at least one rule"),
        (GOOD + "approval: {policy: always, approvers: {acme: ['not an id!']}}\n", "approval.approvers", "approver"),
        (GOOD + "approval: {policy: always, expires_after_seconds: 0}\n", "approval.expires_after_seconds", "greater"),
        (GOOD + "timeout_seconds: -1\n", "timeout_seconds", "greater"),
        (GOOD.replace("url: https", "url: ftp"), "http.url", "pattern"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ToolDefinitionError) as raised:
        load_tool_definition(path)
    assert str(raised.value).startswith(f"{path}: field '{field}'")
    assert message in str(raised.value)
    assert isinstance(raised.value, ConfigurationError)


def test_unreadable_yaml_and_non_mappings_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ToolDefinitionError, match="not valid YAML"):
        load_tool_definition(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ToolDefinitionError, match="expected a mapping"):
        load_tool_definition(_write(tmp_path, "- a list"))


def test_a_folder_with_the_same_tool_twice_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "a.yaml")
    _write(tmp_path, GOOD, "b.yml")
    with pytest.raises(ToolDefinitionError, match=r"b\.yml: field 'name': tool 'lookup' is already defined"):
        load_tool_definitions(tmp_path)


def test_a_missing_folder_is_an_error_and_an_empty_one_has_no_tools(tmp_path: Path) -> None:
    with pytest.raises(ToolDefinitionError, match="does not exist"):
        load_tool_definitions(tmp_path / "absent")
    assert load_tool_definitions(tmp_path) == {}
