"""Built-in tools the runner executes itself: pure, deterministic functions with no side effects.

Because they only compute, running one again after a crash changes nothing, so they need neither an
execution ledger nor approval. Tools with effects belong to the tool-executor.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentbus.contracts.llm import ToolCall, ToolSpec

_MAX_EXPRESSION_LENGTH = 200
_MAX_EXPONENT = 64

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolInputError(ValueError):
    """The arguments cannot be used; the message is shown to the model so it can correct them."""


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolInputError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        result: int | float = _BINARY[type(node.op)](left, right)
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        unary: int | float = _UNARY[type(node.op)](_evaluate(node.operand))
        return unary
    raise ToolInputError(f"unsupported syntax: {ast.dump(node)[:60]}")


def calculator(arguments: dict[str, Any]) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ToolInputError("'expression' must be a non-empty string")
    if len(expression) > _MAX_EXPRESSION_LENGTH:
        raise ToolInputError(f"'expression' is longer than {_MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolInputError(f"cannot parse {expression!r}: {exc.msg}") from exc
    try:
        value = _evaluate(tree)
    except ZeroDivisionError as exc:
        raise ToolInputError("division by zero") from exc
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def word_count(arguments: dict[str, Any]) -> str:
    text = arguments.get("text")
    if not isinstance(text, str):
        raise ToolInputError("'text' must be a string")
    return str(len(text.split()))


@dataclass(frozen=True)
class BuiltinTool:
    spec: ToolSpec
    run: Callable[[dict[str, Any]], str]


BUILTIN_TOOLS: dict[str, BuiltinTool] = {
    "calculator": BuiltinTool(
        ToolSpec(
            name="calculator",
            description="Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
            parameters={
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (2+3)*4"}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        ),
        calculator,
    ),
    "word_count": BuiltinTool(
        ToolSpec(
            name="word_count",
            description="Count the words of a text.",
            parameters={
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
                "additionalProperties": False,
            },
        ),
        word_count,
    ),
}


class BuiltinToolbox:
    """Runs the built-in tools an agent was given; an error comes back as text the model can read."""

    def specs(self, names: list[str]) -> list[ToolSpec]:
        return [BUILTIN_TOOLS[name].spec for name in names]

    def is_local(self, name: str) -> bool:
        return name in BUILTIN_TOOLS

    def execute(self, call: ToolCall, allowed: list[str]) -> str:
        if call.name not in allowed or call.name not in BUILTIN_TOOLS:
            return json.dumps({"error": f"unknown tool {call.name!r}; available: {sorted(allowed)}"})
        try:
            return BUILTIN_TOOLS[call.name].run(call.arguments)
        except ToolInputError as exc:
            return json.dumps({"error": str(exc)})


class ToolCatalog(BuiltinToolbox):
    """The built-in tools, run in-process, plus the tool-executor's tools, offered by their specs only."""

    def __init__(self, remote: dict[str, ToolSpec]) -> None:
        clashes = set(remote) & set(BUILTIN_TOOLS)
        if clashes:
            raise ValueError(f"tools {sorted(clashes)} are both built in and defined for the tool-executor")
        self._remote = remote

    @property
    def names(self) -> set[str]:
        return set(BUILTIN_TOOLS) | set(self._remote)

    def specs(self, names: list[str]) -> list[ToolSpec]:
        return [self._remote[name] if name in self._remote else BUILTIN_TOOLS[name].spec for name in names]


MEMORY_TOOL_SPECS: dict[str, ToolSpec] = {
    "remember": ToolSpec(
        name="remember",
        description="Remember a fact for later tasks (long-term memory of this tenant, kept in the retriever).",
        parameters={
            "type": "object",
            "properties": {"fact": {"type": "string", "description": "The fact, in one or a few sentences."}},
            "required": ["fact"],
            "additionalProperties": False,
        },
    ),
    "recall": ToolSpec(
        name="recall",
        description="Recall facts remembered in earlier tasks that match a query, with their citations.",
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look for."}},
            "required": ["query"],
            "additionalProperties": False,
        },
    ),
}
"""The long-term memory tools: carried out by the runner itself, through the retriever, for agents whose memory
store keeps long-term memory."""
