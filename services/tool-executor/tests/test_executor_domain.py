"""The executor's pure rules: the approval rule language, policies, approvers and decision checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from agentbus.contracts.approvals import arguments_sha256
from agentbus.runtime.tool_registry import ApprovalPolicy, ToolDefinition
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    approval_id_for,
    argument_errors,
    argument_validator,
)
from agentbus.tool_executor.policy import (
    ApproverDirectory,
    DecisionFacts,
    Refusal,
    RuleError,
    approval_need,
    check_decision,
    compile_policy,
    evaluate,
    parse_rule,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def holds(rule: str, arguments: dict[str, Any], risk: Any = "low") -> bool:
    return evaluate(parse_rule(rule), arguments, risk)


@pytest.mark.parametrize(
    ("rule", "arguments", "expected"),
    [
        ('priority == "high"', {"priority": "high"}, True),
        ('priority == "high"', {"priority": "low"}, False),
        ('priority == "high"', {}, False),
        ("priority != 'high'", {"priority": "low"}, True),
        ("amount >= 1000", {"amount": 1000}, True),
        ("amount >= 1000", {"amount": 999.5}, False),
        ("amount > 10", {"amount": "11"}, False),
        ('currency in ["USD", "EUR"]', {"currency": "EUR"}, True),
        ('currency not in ["USD", "EUR"]', {"currency": "EUR"}, False),
        ('"prod" in target', {"target": "eu-prod-1"}, True),
        ('target.namespace == "kube-system"', {"target": {"namespace": "kube-system"}}, True),
        ('args.risk == "x"', {"risk": "x"}, True),
        ('command matches "(^|\\\\s)rm\\\\s"', {"command": "sudo rm -rf /"}, True),
        ('command matches "(^|\\\\s)rm\\\\s"', {"command": "ls -l"}, False),
        ("dry_run", {"dry_run": True}, True),
        ("not dry_run", {"dry_run": False}, True),
        ("not dry_run", {}, True),
        ("a == 1 and (b == 2 or c == 3)", {"a": 1, "c": 3}, True),
        ("a == 1 and (b == 2 or c == 3)", {"a": 1, "c": 4}, False),
        ("flag == true", {"flag": 1}, False),
        ("value == null", {}, True),
    ],
)
def test_rules_evaluate_on_arguments(rule: str, arguments: dict[str, Any], expected: bool) -> None:
    assert holds(rule, arguments) is expected


def test_risk_compares_by_level_not_alphabetically() -> None:
    assert holds('risk >= "high"', {}, "critical")
    assert not holds('risk >= "high"', {}, "medium")
    assert holds('risk in ["high", "critical"]', {}, "high")
    assert not holds('risk == "low"', {}, "medium")


@pytest.mark.parametrize(
    "rule",
    [
        "",
        'priority == "high',
        "priority ==",
        "(a == 1",
        "a == 1 b",
        "__import__('os').system('x')",
        'risk >= "severe"',
        "risk matches 'x'",
        "a matches b",
        'a matches "("',
        "a in [b]",
        "a ; b",
        "(" * 40 + "a" + ")" * 40,
    ],
)
def test_bad_rules_are_refused_when_parsed(rule: str) -> None:
    with pytest.raises(RuleError):
        parse_rule(rule)


def _definition(approval: dict[str, Any], risk: str = "medium") -> ToolDefinition:
    return ToolDefinition.model_validate(
        {
            "name": "t",
            "description": "d",
            "kind": "python",
            "risk": risk,
            "parameters": {"type": "object", "properties": {"priority": {"type": "string"}}},
            "approval": approval,
            "python": {"callable": "m:f"},
        }
    )


def test_policies_never_always_and_first_matching_rule() -> None:
    never = compile_policy(_definition({"policy": "never"}))
    assert approval_need(never, "critical", {"priority": "high"}) is None
    always = compile_policy(_definition({"policy": "always", "reason": "because"}))
    need = approval_need(always, "medium", {})
    assert need is not None
    assert (need.risk, need.reason) == ("medium", "because")
    rules = compile_policy(
        _definition(
            {
                "policy": "rules",
                "rules": [
                    {"when": 'priority == "high"', "risk": "high", "reason": "pages on-call"},
                    {"when": 'risk >= "medium"'},
                ],
            },
            risk="low",
        )
    )
    high = approval_need(rules, "low", {"priority": "high"})
    assert high is not None
    assert (high.risk, high.reason) == ("high", "pages on-call")
    assert approval_need(rules, "low", {"priority": "low"}) is None


def test_a_bad_rule_names_its_field() -> None:
    with pytest.raises(RuleError, match=r"approval\.rules\[1\]\.when"):
        compile_policy(_definition({"policy": "rules", "rules": [{"when": "a == 1"}, {"when": "a =="}]}))


def test_approval_ids_derive_from_the_call_id_and_are_identifiers() -> None:
    first = approval_id_for("task-1.step-2.0:x")
    assert first == approval_id_for("task-1.step-2.0:x")
    assert first != approval_id_for("task-1.step-2.1:x")
    assert len(first) <= 64
    assert first.replace("_", "").isalnum()


def test_arguments_hash_is_canonical_json() -> None:
    assert arguments_sha256({"b": 1, "a": "é"}) == arguments_sha256({"a": "é", "b": 1})
    # sha256 of '{"a":"é","b":1}' in UTF-8, as any client computes it
    import hashlib

    assert arguments_sha256({"b": 1, "a": "é"}) == hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()


def test_approvers_by_id_by_group_and_by_tenant() -> None:
    directory = ApproverDirectory(
        {"*": {"ops": frozenset({"alice"})}, "acme": {"ops": frozenset({"bob"}), "admins": frozenset({"dora"})}}
    )
    policy = ApprovalPolicy(policy="always", approvers={"*": ["group:ops", "erin"], "acme": ["group:admins"]})
    assert directory.may_approve(policy, "acme", "alice")
    assert directory.may_approve(policy, "acme", "bob")
    assert directory.may_approve(policy, "acme", "dora")
    assert directory.may_approve(policy, "globex", "erin")
    assert not directory.may_approve(policy, "globex", "bob")
    assert not directory.may_approve(policy, "globex", "dora")
    assert not directory.may_approve(policy, "acme", "mallory")


def _approval(**changes: Any) -> ApprovalRecord:
    values: dict[str, Any] = {
        "approval_id": "apr_1",
        "call_id": "task.1.0",
        "tenant": "acme",
        "task_id": "task",
        "agent": "ops",
        "tool": "run_shell",
        "arguments": {"command": "ls"},
        "arguments_sha256": arguments_sha256({"command": "ls"}),
        "risk": "high",
        "reason": "r",
        "requested_by": "sam",
        "requested_at": NOW - timedelta(minutes=5),
        "expires_at": NOW + timedelta(hours=1),
    }
    values.update(changes)
    return ApprovalRecord(**values)


def _facts(**changes: Any) -> DecisionFacts:
    values: dict[str, Any] = {
        "subject_tenant": "acme",
        "subject_approver": "alice",
        "approver": "alice",
        "decision": "approve",
        "arguments_sha256": arguments_sha256({"command": "ls"}),
        "approval": _approval(),
        "approver_allowed": True,
        "allow_self_approval": False,
        "submitted_by": "sam",
        "now": NOW,
    }
    values.update(changes)
    return DecisionFacts(**values)


def test_a_valid_decision_passes_every_check() -> None:
    assert check_decision(_facts()) is None
    assert check_decision(_facts(decision="deny")) is None


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"approver": "bob"}, Refusal.APPROVER_MISMATCH),
        ({"approval": None}, Refusal.UNKNOWN_APPROVAL),
        ({"subject_tenant": "globex"}, Refusal.UNKNOWN_APPROVAL),
        ({"approval": _approval(status=ApprovalStatus.APPROVED)}, Refusal.ALREADY_RESOLVED),
        ({"approval": _approval(status=ApprovalStatus.EXPIRED)}, Refusal.ALREADY_RESOLVED),
        ({"now": NOW + timedelta(hours=1)}, Refusal.EXPIRED),
        ({"approver_allowed": False}, Refusal.NOT_ALLOWED),
        ({"submitted_by": "alice"}, Refusal.SELF_APPROVAL),
        ({"submitted_by": None}, Refusal.SUBMITTER_UNKNOWN),
        ({"arguments_sha256": "0" * 64}, Refusal.ARGUMENTS_MISMATCH),
    ],
)
def test_each_refusal(changes: dict[str, Any], refusal: Refusal) -> None:
    result = check_decision(_facts(**changes))
    assert result is not None
    assert result[0] is refusal


def test_self_approval_is_allowed_where_the_policy_says_so_and_self_denial_always() -> None:
    assert check_decision(_facts(submitted_by="alice", allow_self_approval=True)) is None
    assert check_decision(_facts(submitted_by="alice", decision="deny")) is None


def test_an_unknown_submitter_never_counts_as_someone_else() -> None:
    refused = check_decision(_facts(submitted_by=None))
    assert refused is not None
    assert refused[0] is Refusal.SUBMITTER_UNKNOWN
    assert check_decision(_facts(submitted_by=None, allow_self_approval=True)) is None
    assert check_decision(_facts(submitted_by=None, decision="deny")) is None, "denying is always allowed"


def test_the_identity_checked_is_the_subjects_never_the_bodys() -> None:
    # The body claims bob, the subject (bound to the sender by nats-server) says alice, who submitted the task.
    refused = check_decision(_facts(subject_approver="alice", approver="bob", submitted_by="alice"))
    assert refused is not None
    assert refused[0] is Refusal.APPROVER_MISMATCH
    self_approval = check_decision(_facts(subject_approver="alice", approver="alice", submitted_by="alice"))
    assert self_approval is not None
    assert self_approval[0] is Refusal.SELF_APPROVAL


def test_argument_errors_are_readable_and_bounded() -> None:
    schema = {
        "type": "object",
        "properties": {"priority": {"enum": ["low", "high"]}, "title": {"type": "string"}},
        "required": ["title"],
        "additionalProperties": False,
    }
    errors = argument_errors(argument_validator(schema), {"priority": "urgent", "extra": 1})
    assert any(e.startswith("priority:") and "urgent" in e for e in errors)
    assert any("title" in e and "required" in e for e in errors)
    assert any("extra" in e for e in errors)
    many = argument_errors(
        argument_validator({"type": "object", "additionalProperties": {"type": "string"}}),
        {str(i): i for i in range(30)},
    )
    assert len(many) == 11
    assert many[-1] == "... and 20 more"
    assert argument_errors(argument_validator(schema), {"title": "ok", "priority": "low"}) == []
