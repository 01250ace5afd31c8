"""Spec and configuration files in YAML: read, validated, and every error one line naming the file and field.

Agents, tools, memory stores, workflows, routing and guardrails are all declared this way, and a bad file
must stop start-up with the same kind of message whichever it is: `<file>: field 'a.b[0].c': <why>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

SpecT = TypeVar("SpecT", bound=BaseModel)


def field_path(location: Iterable[int | str]) -> str:
    """`approval.rules[0].when` from a pydantic error location."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any] | None:
    """The file's top-level mapping (None for an empty file). Raises `error` naming the file when it cannot
    be read, is not YAML, or holds something other than a mapping."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    return raw


def validated(model: type[SpecT], raw: Any, source: Path | str, error: type[Exception]) -> SpecT:
    """`raw` as a `model`; raises `error` naming `source` and the first field at fault."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise error(f"{source}: field '{field_path(first['loc'])}': {first['msg']}") from exc


def load_spec(path: Path, model: type[SpecT], error: type[Exception]) -> SpecT:
    """One spec file as a `model`."""
    raw = read_yaml_mapping(path, error)
    if raw is None:
        raise error(f"{path}: expected a mapping of fields, got an empty file")
    return validated(model, raw, path, error)


def spec_files(directory: Path) -> list[Path]:
    """The `*.yaml` and `*.yml` files of a spec folder, in name order."""
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
