"""Templates and paths of workflow specs: `{{ .input.topic }}`, `{{ .steps.research.output.research_data }}`.

A template names the workflow's input (`.input.<name>`) or a named output of an earlier step
(`.steps.<step>.output.<name>`), optionally followed by a path into that value (`.sources`, `.0`). A string
that is exactly one template becomes the value itself (an object stays an object); templates inside a longer
string are replaced by their text (JSON for anything but a string). Nothing is ever evaluated as code.

A step's result document is `{"result": R}`, where R is its task's answer as JSON when the answer is JSON or
holds a JSON object (the first one that parses, e.g. inside a ```json block), else the answer's text. Output
paths start at `.result`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

_TEMPLATE = re.compile(r"\{\{((?:(?!\}\}).)*)\}\}", re.S)
_SEGMENT = r"[A-Za-z0-9_-]+"
_PATH = re.compile(rf"^(\.{_SEGMENT})+$")
RESULT_ROOT = "result"
_MAX_JSON_SCANS = 64


class TemplateError(ValueError):
    """A template or path that is malformed, or names something that is not there."""


@dataclass(frozen=True)
class Reference:
    """What one template names: an input or a step's output, and a path into it."""

    root: Literal["input", "steps"]
    name: str
    """The input's name, or the output's name."""
    step: str | None = None
    path: tuple[str, ...] = ()

    def __str__(self) -> str:
        head = f".input.{self.name}" if self.root == "input" else f".steps.{self.step}.output.{self.name}"
        return head + "".join(f".{segment}" for segment in self.path)


def split_path(path: str) -> tuple[str, ...]:
    """`.a.b.0` as ("a", "b", "0"); TemplateError when it is not a path of plain segments."""
    text = path.strip()
    if not _PATH.fullmatch(text):
        raise TemplateError(f"{path!r} is not a path like .result.data (segments of A-Z, a-z, 0-9, '_', '-')")
    return tuple(text[1:].split("."))


def parse_reference(expression: str) -> Reference:
    """The reference a template's expression (the text between `{{` and `}}`) makes."""
    segments = split_path(expression)
    if segments[0] == "input" and len(segments) >= 2:
        return Reference("input", segments[1], path=segments[2:])
    if segments[0] == "steps" and len(segments) >= 4 and segments[2] == "output":
        return Reference("steps", segments[3], step=segments[1], path=segments[4:])
    raise TemplateError(f"{{{{ {expression.strip()} }}}} names neither .input.<name> nor .steps.<step>.output.<name>")


def references(value: Any) -> list[Reference]:
    """Every reference made by the templates in a value (strings inside lists and mappings too)."""
    if isinstance(value, str):
        return [parse_reference(match.group(1)) for match in _TEMPLATE.finditer(value)]
    if isinstance(value, Mapping):
        return [ref for item in value.values() for ref in references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    return []


def lookup(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` (keys of objects, indexes of lists); TemplateError naming the missing segment."""
    for index, segment in enumerate(path):
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            where = "." + ".".join(path[: index + 1])
            raise TemplateError(f"{where} is not there (found {_kind(value)})")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"an object with {sorted(value)[:10]}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class Context:
    """What templates may read: the run's input and the outputs of the steps that completed."""

    input: Mapping[str, Any]
    outputs: Mapping[str, Mapping[str, Any]]

    def resolve(self, reference: Reference) -> Any:
        if reference.root == "input":
            if reference.name not in self.input:
                raise TemplateError(f"{reference}: the run has no input {reference.name!r}")
            base = self.input[reference.name]
        else:
            assert reference.step is not None
            outputs = self.outputs.get(reference.step)
            if outputs is None or reference.name not in outputs:
                raise TemplateError(f"{reference}: step {reference.step!r} has no output {reference.name!r}")
            base = outputs[reference.name]
        try:
            return lookup(base, reference.path)
        except TemplateError as exc:
            raise TemplateError(f"{reference}: {exc}") from exc


def render(value: Any, context: Context, *, missing_as_null: bool = False) -> Any:
    """`value` with every template replaced. With `missing_as_null`, a reference to something that is not
    there becomes null (or empty text inside a longer string) instead of a TemplateError."""

    def resolve(reference: Reference) -> Any:
        try:
            return context.resolve(reference)
        except TemplateError:
            if missing_as_null:
                return None
            raise

    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole is not None:
            return resolve(parse_reference(whole.group(1)))
        return _TEMPLATE.sub(lambda match: _as_text(resolve(parse_reference(match.group(1)))), value)
    if isinstance(value, Mapping):
        return {key: render(item, context, missing_as_null=missing_as_null) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context, missing_as_null=missing_as_null) for item in value]
    return value


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def task_input(rendered: Any) -> str:
    """The text a step's task gets: a rendered string as it is, anything else as JSON."""
    if isinstance(rendered, str):
        return rendered
    return json.dumps(rendered, ensure_ascii=False)


def parse_answer(text: str) -> Any:
    """The JSON an agent's answer is or holds (see the module docstring), else the text itself."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced is not None:
        try:
            return json.loads(fenced.group(1))
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    start = text.find("{")
    scans = 0
    while start != -1 and scans < _MAX_JSON_SCANS:
        try:
            found, _ = decoder.raw_decode(text, start)
        except ValueError:
            found = None
        if isinstance(found, dict):
            return found
        scans += 1
        start = text.find("{", start + 1)
    return text


def extract(answer: str, path: tuple[str, ...]) -> Any:
    """The value at an output path (`("result", ...)`) of a step's result document."""
    return lookup({RESULT_ROOT: parse_answer(answer)}, path)
