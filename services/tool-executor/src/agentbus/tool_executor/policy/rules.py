"""The rule language of approval policies (the `when` of a rule): parsed once at start-up, never `eval`-ed.

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

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentbus.runtime.tool_registry import RISK_ORDER, Risk

MAX_RULE_LENGTH = 1000
MAX_RULE_DEPTH = 32


class RuleError(ValueError):
    """A rule cannot be parsed; the message says where."""


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
