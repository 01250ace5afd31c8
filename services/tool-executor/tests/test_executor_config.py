"""Start-up checks: a bad tool file, rule, approver group, secret or setting stops the executor with a
message naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agentbus.runtime.errors import ConfigurationError
from agentbus.tool_executor.app import create_app
from executor_harness import executor_settings

SHELL_TOOL = """
name: {name}
description: d
kind: shell
parameters: {{type: object}}
approval: {approval}
shell: {{command: [echo]}}
"""


@pytest.mark.parametrize(
    ("approval", "message"),
    [
        ('{policy: rules, rules: [{when: "priority =="}]}', "field 'approval.rules[0].when'"),
        ('{policy: always, approvers: {"*": ["group:nobody"]}}', "field 'approval.approvers.*[0]': group 'nobody'"),
    ],
)
def test_a_bad_rule_or_unknown_group_stops_start_up(tmp_path: Path, approval: str, message: str) -> None:
    settings = executor_settings("nats://127.0.0.1:1", tmp_path)
    bad = settings.tools_dir / "zz_bad.yaml"
    bad.write_text(SHELL_TOOL.format(name="zz_bad", approval=approval))
    with pytest.raises(ConfigurationError) as raised:
        create_app(settings)
    assert str(raised.value).startswith(str(bad))
    assert message in str(raised.value)


def test_a_missing_secret_or_callable_stops_start_up(tmp_path: Path) -> None:
    settings = executor_settings("nats://127.0.0.1:1", tmp_path)
    http = settings.tools_dir / "zz_http.yaml"
    http.write_text(
        "name: zz_http\ndescription: d\nkind: http\nparameters: {type: object}\n"
        "http: {url: 'https://x.invalid', headers: {Authorization: {secret_env: ZZ_UNSET_TOKEN}}}\n"
    )
    with pytest.raises(ConfigurationError, match=r"zz_http\.yaml: field 'http\.headers\.Authorization"):
        create_app(settings)
    http.unlink()
    python = settings.tools_dir / "zz_python.yaml"
    python.write_text(
        "name: zz_python\ndescription: d\nkind: python\nparameters: {type: object}\n"
        "python: {callable: 'agentbus.tool_executor.builtins.tickets:no_such_function'}\n"
    )
    with pytest.raises(ConfigurationError, match=r"zz_python\.yaml: field 'python\.callable'"):
        create_app(settings)


def test_a_bad_approvers_file_names_itself(tmp_path: Path) -> None:
    settings = executor_settings("nats://127.0.0.1:1", tmp_path)
    settings.approvers_file.write_text("groups: {acme: {ops: [not valid!]}}\n")
    with pytest.raises(ConfigurationError, match=r"approvers\.yaml: field 'groups\.acme\.ops\[0\]'"):
        create_app(settings)
    with pytest.raises(ConfigurationError, match="cannot read the approvers file"):
        create_app(executor_settings("nats://127.0.0.1:1", tmp_path, approvers_file=tmp_path / "absent.yaml"))


def test_the_process_exits_2_with_a_one_line_reason(tmp_path: Path) -> None:
    settings = executor_settings("nats://127.0.0.1:1", tmp_path)
    (settings.tools_dir / "broken.yaml").write_text("name: broken\nkind: shell\n")
    done = subprocess.run(
        [sys.executable, "-m", "agentbus.tool_executor"],
        env={"AGENTBUS_EXECUTOR_TOOLS_DIR": str(settings.tools_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "broken.yaml: field" in done.stderr
