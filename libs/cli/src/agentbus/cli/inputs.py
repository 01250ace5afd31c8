"""Turning what a person typed into a contract message, or one clear line saying what is wrong."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import click
from agentbus.contracts.common import ID_PATTERN
from pydantic import BaseModel, ValidationError

_ID = re.compile(ID_PATTERN)

ModelT = TypeVar("ModelT", bound=BaseModel)

_OPTION_NAMES = {
    "task_id": "--task-id",
    "tenant": "--tenant",
    "agent": "--agent",
    "input": "TASK_INPUT",
    "budget_usd": "--budget-usd",
    "deadline_seconds": "--deadline",
    "reason": "--reason",
    "approval_id": "APPROVAL_ID",
    "approver": "--as",
    "query": "QUERY",
    "top_k": "--top-k",
    "since": "--since",
}


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem, as `--option: message` (pydantic's own text carries a documentation URL)."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    name = _OPTION_NAMES.get(field, field or "input")
    message = first["msg"]
    if first["type"] == "string_pattern_mismatch":
        message = "use 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
    elif first["type"] == "string_too_short":
        message = "must not be empty"
    return f"{name}: {message} (got {first['input']!r})" if "input" in first else f"{name}: {message}"


def parse_input(model: type[ModelT], **fields: Any) -> ModelT:
    """`model(**fields)`, or a usage error (exit 2) naming the option and what is wrong with it."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc)) from exc


def check_identifier(option: str, value: str | None) -> None:
    """A usage error unless `value` (when given) is an identifier: tenants, task ids, approvers, approvals."""
    if value is not None and not _ID.fullmatch(value):
        raise click.UsageError(f"{option}: use 1 to 64 of A-Z, a-z, 0-9, '_' and '-' (got {value!r})")
