"""Pure rules of the tool-executor: approval policies and their rule language, decision checks, argument
validation, and the records the ledger keeps. No I/O here.

Rule language (the `when` of an approval rule)
----------------------------------------------
A condition on the call's arguments and the tool's risk, parsed once at start-up (never `eval`-ed)::

    priority == "high"
    amount >= 1000 and currency in ["USD", "EUR"]
    not dry_run or risk >= "high"
    command matches "(^|\\s)rm\\s"

- Names are arguments (`priority`, or a dotted path into an object: `target.namespace`); `args.<name>`
  says the same explicitly. A missing argument is `null`. The bare name `risk` is the tool's risk level,
  compared in the order low < medium < high < critical.
- Literals: "strings" or 'strings', numbers, true, false, null, and lists `[...]` of literals.
- Operators: == != < <= > >= in, not in, matches (a regular expression searched in a string), and, or,
  not, parentheses. A bare name is true when the argument is truthy.
- Comparisons between mismatched types are false rather than errors: a rule never crashes a call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import jsonschema
from agentbus.runtime.tool_registry import ANY_TENANT, RISK_ORDER, ApprovalPolicy, Risk, ToolDefinition

MAX_RULE_LENGTH = 1000
MAX_RULE_DEPTH = 32
MAX_SCHEMA_ERRORS = 10


class RuleError(ValueError):
    """A rule cannot be parsed; the message says where."""


# --- rule language ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<number>-?\d+(?:\.\d+)?)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "matches", "true", "false", "null"}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "in", "not in", "matches"}


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(source):
        if source[position:].strip() == "":
            break
        match = _TOKEN.match(source, position)
        if match is None or match.end() == position:
            raise RuleError(f"unexpected character {source[position:].strip()[:1]!r} at {position}")
        kind = match.lastgroup or ""
        text = match.group(kind)
        start = match.start(kind)
        if kind == "name" and text in _KEYWORDS:
            kind = "keyword"
        tokens.append(_Token(kind, text, start))
        position = match.end()
    return tokens


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Name:
    path: tuple[str, ...]
    is_risk: bool = False


@dataclass(frozen=True)
class Compare:
    op: str
    left: Node
    right: Node
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class BoolOp:
    op: str
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    operand: Node


Node = Const | Name | Compare | BoolOp | Not


class _Parser:
    def __init__(self, source: str) -> None:
        if len(source) > MAX_RULE_LENGTH:
            raise RuleError(f"longer than {MAX_RULE_LENGTH} characters")
        self._tokens = _tokenize(source)
        self._index = 0
        self._depth = 0

    def parse(self) -> Node:
        if not self._tokens:
            raise RuleError("empty rule")
        node = self._or()
        if self._index < len(self._tokens):
            token = self._tokens[self._index]
            raise RuleError(f"unexpected {token.text!r} at {token.position}")
        return node

    def _peek(self) -> _Token | None:
        return self._tokens[self._index] if self._index < len(self._tokens) else None

    def _take(self, text: str | None = None) -> _Token:
        token = self._peek()
        if token is None:
            raise RuleError(f"rule ends where {text!r} was expected" if text else "rule ends too early")
        if text is not None and token.text != text:
            raise RuleError(f"expected {text!r} at {token.position}, found {token.text!r}")
        self._index += 1
        return token

    def _accept(self, text: str) -> bool:
        token = self._peek()
        if token is not None and token.text == text and token.kind in ("keyword", "op"):
            self._index += 1
            return True
        return False

    def _or(self) -> Node:
        operands = [self._and()]
        while self._accept("or"):
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def _and(self) -> Node:
        operands = [self._not()]
        while self._accept("and"):
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def _not(self) -> Node:
        if self._accept("not"):
            return Not(self._nested(self._not))
        return self._comparison()

    def _nested(self, parse: Any) -> Node:
        self._depth += 1
        if self._depth > MAX_RULE_DEPTH:
            raise RuleError(f"nested deeper than {MAX_RULE_DEPTH}")
        try:
            node: Node = parse()
            return node
        finally:
            self._depth -= 1

    def _comparison(self) -> Node:
        left = self._operand()
        token = self._peek()
        if token is None:
            return left
        op: str | None = None
        if (token.kind == "op" and token.text in _COMPARISONS) or (
            token.kind == "keyword" and token.text in ("in", "matches")
        ):
            op = token.text
            self._index += 1
        elif token.kind == "keyword" and token.text == "not":
            following = self._tokens[self._index + 1] if self._index + 1 < len(self._tokens) else None
            if following is not None and following.text == "in":
                op = "not in"
                self._index += 2
        if op is None:
            return left
        right = self._operand()
        return _checked_comparison(op, left, right, token.position)

    def _operand(self) -> Node:
        token = self._take()
        if token.text == "(" and token.kind == "op":
            node = self._nested(self._or)
            self._take(")")
            return node
        if token.text == "[" and token.kind == "op":
            values: list[Any] = []
            if not self._accept("]"):
                while True:
                    item = self._operand()
                    if not isinstance(item, Const):
                        raise RuleError(f"list items must be literals (at {token.position})")
                    values.append(item.value)
                    if self._accept("]"):
                        break
                    self._take(",")
            return Const(tuple(values))
        if token.kind == "number":
            return Const(float(token.text) if "." in token.text else int(token.text))
        if token.kind == "string":
            return Const(_unquote(token.text))
        if token.kind == "keyword" and token.text in ("true", "false", "null"):
            return Const({"true": True, "false": False, "null": None}[token.text])
        if token.kind == "name":
            parts = tuple(token.text.split("."))
            if parts == ("risk",):
                return Name(parts, is_risk=True)
            return Name(parts[1:] if parts[0] == "args" and len(parts) > 1 else parts)
        raise RuleError(f"unexpected {token.text!r} at {token.position}")


def _checked_comparison(op: str, left: Node, right: Node, position: int) -> Compare:
    for side, other in ((left, right), (right, left)):
        if isinstance(side, Name) and side.is_risk:
            if op in ("matches",):
                raise RuleError(f"'risk' cannot be matched as text (at {position})")
            values = other.value if isinstance(other, Const) else None
            candidates = values if isinstance(values, tuple) else (values,)
            if not isinstance(other, Const) or any(v not in RISK_ORDER for v in candidates):
                raise RuleError(f"'risk' compares with one of {list(RISK_ORDER)} (at {position})")
    pattern = None
    if op == "matches":
        if not (isinstance(right, Const) and isinstance(right.value, str)):
            raise RuleError(f"'matches' needs a string pattern on its right (at {position})")
        try:
            pattern = re.compile(right.value)
        except re.error as exc:
            raise RuleError(f"bad pattern {right.value!r}: {exc}") from exc
    return Compare(op, left, right, pattern)


def parse_rule(source: str) -> Node:
    """Parse a rule into a tree, or raise RuleError."""
    return _Parser(source).parse()


@dataclass(frozen=True)
class _RiskValue:
    rank: int


def _resolve(node: Node, arguments: Mapping[str, Any], risk: Risk) -> Any:
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Name):
        if node.is_risk:
            return _RiskValue(RISK_ORDER.index(risk))
        value: Any = arguments
        for part in node.path:
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value
    return evaluate(node, arguments, risk)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) != isinstance(right, bool):
        return False
    if isinstance(left, tuple | list) and isinstance(right, tuple | list):
        return list(left) == list(right)
    return bool(left == right)


def _compare(op: str, left: Any, right: Any, pattern: re.Pattern[str] | None) -> bool:
    if isinstance(left, _RiskValue) or isinstance(right, _RiskValue):
        left = left.rank if isinstance(left, _RiskValue) else RISK_ORDER.index(left)
        if isinstance(right, tuple):
            right = tuple(RISK_ORDER.index(v) for v in right)
        else:
            right = right.rank if isinstance(right, _RiskValue) else RISK_ORDER.index(right)
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    if op in ("in", "not in"):
        if isinstance(right, tuple | list):
            found = any(_equal(left, item) for item in right)
        elif isinstance(right, str) and isinstance(left, str):
            found = left in right
        else:
            return False
        return found if op == "in" else not found
    if op == "matches":
        return isinstance(left, str) and pattern is not None and pattern.search(left) is not None
    comparable = (_is_number(left) and _is_number(right)) or (isinstance(left, str) and isinstance(right, str))
    if not comparable:
        return False
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def evaluate(node: Node, arguments: Mapping[str, Any], risk: Risk) -> bool:
    """Whether a parsed rule holds for these arguments and this tool risk."""
    if isinstance(node, BoolOp):
        if node.op == "and":
            return all(evaluate(o, arguments, risk) for o in node.operands)
        return any(evaluate(o, arguments, risk) for o in node.operands)
    if isinstance(node, Not):
        return not evaluate(node.operand, arguments, risk)
    if isinstance(node, Compare):
        left = _resolve(node.left, arguments, risk)
        right = _resolve(node.right, arguments, risk)
        return _compare(node.op, left, right, node.pattern)
    value = _resolve(node, arguments, risk)
    if isinstance(value, _RiskValue):
        return True
    return bool(value)


# --- approval policies -----------------------------------------------------------------------------


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


def approval_id_for(call_id: str) -> str:
    """The approval of a call, derived from its id, so a redelivered call never creates a second approval."""
    return "apr_" + hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:40]


# --- approvers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApproverDirectory:
    """Approver groups per tenant; groups under '*' apply to every tenant."""

    groups: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)

    def members(self, tenant: str, group: str) -> frozenset[str]:
        shared = self.groups.get(ANY_TENANT, {}).get(group, frozenset())
        return shared | self.groups.get(tenant, {}).get(group, frozenset())

    def group_defined(self, tenant: str, group: str) -> bool:
        if tenant == ANY_TENANT:
            return any(group in groups for groups in self.groups.values())
        return group in self.groups.get(ANY_TENANT, {}) or group in self.groups.get(tenant, {})

    def may_approve(self, policy: ApprovalPolicy, tenant: str, approver: str) -> bool:
        """Whether `approver` is named, directly or through a group, for this tenant or for every tenant."""
        entries = [*policy.approvers.get(ANY_TENANT, []), *policy.approvers.get(tenant, [])]
        for entry in entries:
            if entry.startswith("group:"):
                if approver in self.members(tenant, entry.removeprefix("group:")):
                    return True
            elif entry == approver:
                return True
        return False


# --- ledger records --------------------------------------------------------------------------------


class CallStatus(StrEnum):
    """Where a tool call stands in the execution ledger."""

    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"
    """May run: approved, or needing no approval."""
    RUNNING = "running"
    """Claimed by an executor under a lease; its outcome is not recorded yet."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DENIED = "denied"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    """Started, not recorded as finished, and not safe to run again: the outcome is unknown."""


TERMINAL_STATUSES = frozenset(
    {CallStatus.SUCCEEDED, CallStatus.FAILED, CallStatus.DENIED, CallStatus.EXPIRED, CallStatus.INTERRUPTED}
)


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


@dataclass(frozen=True)
class ApprovalRecord:
    """A stored approval: what waits (or waited) for a human, and how it ended."""

    approval_id: str
    call_id: str
    tenant: str
    task_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    arguments_sha256: str
    risk: Risk
    reason: str
    requested_by: str | None
    requested_at: datetime
    expires_at: datetime
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_by: str | None = None
    decided_at: datetime | None = None
    decision_reason: str | None = None
    decision_seq: int | None = None


@dataclass(frozen=True)
class ToolResult:
    """What the model reads back: success, text, an error and citations (as JSON-ready dicts)."""

    ok: bool
    content: str
    error_code: str | None = None
    error_message: str | None = None
    citations: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class CallRecord:
    """A tool call in the execution ledger, keyed by call_id."""

    call_id: str
    tool_call_id: str
    tenant: str
    task_id: str
    agent: str
    tool: str
    step: int
    arguments: dict[str, Any]
    submitted_by: str | None
    status: CallStatus
    approval_id: str | None
    traceparent: str | None
    created_at: datetime
    lease_owner: str | None = None
    lease_until: datetime | None = None
    attempts: int = 0
    result: ToolResult | None = None


# --- decisions -------------------------------------------------------------------------------------


class Refusal(StrEnum):
    """Why a decision was refused. The approval stays as it was."""

    MALFORMED = "malformed"
    APPROVER_MISMATCH = "approver_mismatch"
    UNKNOWN_APPROVAL = "unknown_approval"
    ALREADY_RESOLVED = "already_resolved"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    SELF_APPROVAL = "self_approval"
    ARGUMENTS_MISMATCH = "arguments_mismatch"


@dataclass(frozen=True)
class DecisionFacts:
    """Everything a decision is checked against."""

    subject_tenant: str
    subject_approver: str
    approver: str
    decision: str
    arguments_sha256: str
    approval: ApprovalRecord | None
    approver_allowed: bool
    allow_self_approval: bool
    submitted_by: str | None
    now: datetime


def check_decision(facts: DecisionFacts) -> tuple[Refusal, str] | None:
    """The first reason to refuse this decision, with a message, or None when it may be applied."""
    if facts.approver != facts.subject_approver:
        return Refusal.APPROVER_MISMATCH, (
            f"the decision names approver {facts.approver!r} but was sent on {facts.subject_approver!r}'s subject"
        )
    approval = facts.approval
    if approval is None or approval.tenant != facts.subject_tenant:
        return Refusal.UNKNOWN_APPROVAL, "no such approval for this tenant"
    if approval.status is not ApprovalStatus.PENDING:
        return Refusal.ALREADY_RESOLVED, f"the approval is already {approval.status.value}"
    if facts.now >= approval.expires_at:
        return Refusal.EXPIRED, f"the approval expired at {approval.expires_at.isoformat()}"
    if not facts.approver_allowed:
        return Refusal.NOT_ALLOWED, f"{facts.approver!r} may not decide on {approval.tool!r} for {approval.tenant!r}"
    if (
        facts.decision == "approve"
        and not facts.allow_self_approval
        and facts.submitted_by is not None
        and facts.submitted_by == facts.approver
    ):
        return Refusal.SELF_APPROVAL, f"{facts.approver!r} submitted this task and may not approve its own calls"
    if facts.arguments_sha256 != approval.arguments_sha256:
        return Refusal.ARGUMENTS_MISMATCH, "the arguments hash differs from the pending call's arguments"
    return None


# --- validation and the texts the model reads ------------------------------------------------------


def argument_errors(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
    """Schema violations of the arguments, readable by the model, at most MAX_SCHEMA_ERRORS."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
    lines = []
    for error in errors[:MAX_SCHEMA_ERRORS]:
        where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
        lines.append(f"{where}: {error.message}")
    if len(errors) > MAX_SCHEMA_ERRORS:
        lines.append(f"... and {len(errors) - MAX_SCHEMA_ERRORS} more")
    return lines


def invalid_arguments_result(tool: str, errors: list[str]) -> ToolResult:
    content = (
        f"The call to {tool!r} was not run: its arguments do not match the tool's schema.\n"
        + "\n".join(f"- {line}" for line in errors)
        + "\nCorrect the arguments and call the tool again."
    )
    return ToolResult(False, content, "invalid_arguments", "; ".join(errors))


def unknown_tool_result(tool: str, known: list[str]) -> ToolResult:
    message = f"unknown tool {tool!r}; tools this executor runs: {sorted(known)}"
    return ToolResult(False, f"The call was not run: {message}.", "unknown_tool", message)


def denied_result(tool: str, by: str | None, reason: str | None) -> ToolResult:
    why = f" Reason: {reason}" if reason else " No reason was given."
    content = (
        f"The call to {tool!r} was denied by approver {by or 'unknown'} and did not run.{why} "
        "Do not repeat the same call; change the approach or ask the user."
    )
    return ToolResult(False, content, "approval_denied", f"denied by {by}: {reason or 'no reason given'}")


def expired_result(tool: str, expires_at: datetime) -> ToolResult:
    content = (
        f"The call to {tool!r} needed approval, but no approver decided before it expired at "
        f"{expires_at.isoformat()}. It did not run."
    )
    return ToolResult(False, content, "approval_expired", f"approval expired at {expires_at.isoformat()}")


def interrupted_result(tool: str) -> ToolResult:
    content = (
        f"execution_interrupted: outcome unknown. The executor stopped while {tool!r} was running, before its "
        "outcome was recorded, and this tool is not safe to run twice, so it was not run again. Check whether "
        "its effect happened before calling it again."
    )
    return ToolResult(False, content, "execution_interrupted", "outcome unknown: stopped during execution")
