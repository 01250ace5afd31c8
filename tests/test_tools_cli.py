"""`agentbus tools list`: every tool with its source, risk and approval policy, read from the tools folder."""

from __future__ import annotations

import json
from pathlib import Path

from agentbus.cli.main import cli
from click.testing import CliRunner

REPO_TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _rows(output: str) -> dict[str, dict[str, object]]:
    return {row["name"]: row for row in map(json.loads, output.splitlines())}


def test_tools_list_shows_each_tool_with_its_source_risk_and_policy() -> None:
    result = CliRunner().invoke(cli, ["tools", "list", "--tools-dir", str(REPO_TOOLS), "--json"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["helpdesk__close_ticket"] == {
        "name": "helpdesk__close_ticket",
        "spec_name": "helpdesk.close_ticket",
        "source": f"mcp helpdesk/close_ticket (stdio, {REPO_TOOLS / 'helpdesk.yaml'})",
        "risk": "high",
        "approval": "always",
        "rerun_safe": True,
    }
    assert (rows["helpdesk__open_ticket"]["approval"], rows["helpdesk__open_ticket"]["rerun_safe"]) == (
        'rules: priority == "high"',
        False,
    )
    assert rows["run_shell"]["source"] == f"shell ({REPO_TOOLS / 'run_shell.yaml'})"
    assert (rows["calculator"]["source"], rows["calculator"]["risk"]) == ("built-in (agent-runner)", "-")


def test_tools_list_prints_a_table_with_one_line_per_tool() -> None:
    result = CliRunner().invoke(cli, ["tools", "list", "--tools-dir", str(REPO_TOOLS)])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["TOOL", "AGENT", "SPEC", "NAME", "SOURCE", "RISK", "RERUN", "APPROVAL"]
    [close] = [line for line in lines if line.startswith("helpdesk__close_ticket ")]
    assert close.split()[:2] == ["helpdesk__close_ticket", "helpdesk.close_ticket"]
    assert close.split()[-3:] == ["high", "yes", "always"]


def test_a_bad_tools_folder_is_one_line_naming_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "srv.yaml"
    bad.write_text("name: srv\nkind: mcp\ntransport: {type: stdio, command: x}\ntools: {t: {description: d}}\n")
    result = CliRunner().invoke(cli, ["tools", "list", "--tools-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {bad}: field 'defaults': Field required")
    missing = CliRunner().invoke(cli, ["tools", "list", "--tools-dir", str(tmp_path / "absent")])
    assert (missing.exit_code, missing.output) == (1, f"Error: {tmp_path / 'absent'}: tool folder does not exist\n")
