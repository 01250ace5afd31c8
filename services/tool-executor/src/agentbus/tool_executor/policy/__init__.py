"""Approval policy: the rule language, which calls wait for a human, who may decide, and which decisions stand."""

from agentbus.tool_executor.policy.approval import (
    ApprovalNeed,
    CompiledPolicy,
    CompiledRule,
    approval_need,
    compile_policy,
    higher_risk,
)
from agentbus.tool_executor.policy.approvers import ApproverDirectory
from agentbus.tool_executor.policy.decisions import DecisionFacts, Refusal, check_decision
from agentbus.tool_executor.policy.rules import RuleError, evaluate, parse_rule

__all__ = [
    "ApprovalNeed",
    "ApproverDirectory",
    "CompiledPolicy",
    "CompiledRule",
    "DecisionFacts",
    "Refusal",
    "RuleError",
    "approval_need",
    "check_decision",
    "compile_policy",
    "evaluate",
    "higher_risk",
    "parse_rule",
]
