"""Approval policies: whether a call waits for a human (`never`, `always`, or the first rule that holds)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentbus.runtime.tool_registry import RISK_ORDER, ApprovalPolicy, Risk, ToolDefinition
from agentbus.tool_executor.policy.rules import Node, RuleError, evaluate, parse_rule


@dataclass(frozen=True)
class CompiledRule:
    condition: Node
    source: str
    reason: str
    risk: Risk | None


@dataclass(frozen=True)
class ApprovalNeed:
    """Why a call waits for a human, and the risk shown to approvers."""

    risk: Risk
    reason: str


@dataclass(frozen=True)
class CompiledPolicy:
    policy: ApprovalPolicy
    rules: tuple[CompiledRule, ...]


def compile_policy(definition: ToolDefinition) -> CompiledPolicy:
    """Parse a tool's approval rules. Raises RuleError with the field path (`approval.rules[i].when`)."""
    rules = []
    for index, rule in enumerate(definition.approval.rules):
        try:
            condition = parse_rule(rule.when)
        except RuleError as exc:
            raise RuleError(f"approval.rules[{index}].when: {exc}") from exc
        rules.append(CompiledRule(condition, rule.when, rule.reason or f"rule: {rule.when}", rule.risk))
    return CompiledPolicy(definition.approval, tuple(rules))


def higher_risk(a: Risk, b: Risk | None) -> Risk:
    if b is None:
        return a
    return a if RISK_ORDER.index(a) >= RISK_ORDER.index(b) else b


def approval_need(compiled: CompiledPolicy, risk: Risk, arguments: Mapping[str, Any]) -> ApprovalNeed | None:
    """Whether this call must wait for approval: `always`, or the first rule that holds."""
    policy = compiled.policy
    if policy.policy == "never":
        return None
    if policy.policy == "always":
        return ApprovalNeed(risk, policy.reason or "this tool always needs approval")
    for rule in compiled.rules:
        if evaluate(rule.condition, arguments, risk):
            return ApprovalNeed(higher_risk(risk, rule.risk), rule.reason)
    return None
