"""Workflow specs: YAML files in `workflows/`, the seed's `Workflow` resource.

A workflow declares typed inputs (with defaults and enums), steps that each name an agent, take templated
inputs from the workflow's input and earlier steps' outputs, extract named outputs by path, depend on other
steps, and have their own timeout and retries; error handling (`onStepFailure: retry|fail|continue`), an
overall timeout, a concurrency limit with a policy (`queue`, `reject`, `replace`), and outputs assembled
from step outputs. Field names follow the seed (camelCase). Everything is checked at start-up: a cycle, an
unknown agent, a template naming a step that is not upstream or an output it does not declare, or an output
path that cannot exist stops the service, naming the file and the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from agentbus.contracts.common import Identifier
from agentbus.contracts.workflows import (
    ConcurrencyPolicy,
    InputType,
    StepFailurePolicy,
    WorkflowInfo,
    WorkflowInputInfo,
    WorkflowStepInfo,
)
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import load_spec, spec_files
from agentbus.workflow_orchestrator.templates import (
    RESULT_ROOT,
    Reference,
    TemplateError,
    references,
    split_path,
)
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

DEFAULT_TIMEOUT_SECONDS = 3600.0
MAX_RETRIES = 10
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """`300s`, `5m`, `1h30m`, `2d` or a number of seconds, as seconds. Anything else is left to fail validation."""
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text:
            return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, le=30 * 86400)]
"""Seconds, written as `300s`, `5m`, `1h` (or a number of seconds)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=False, serialize_by_alias=True)


class InputSpec(_Spec):
    name: Identifier
    type: InputType = "string"
    required: bool = False
    default: Any = None
    enum: list[Any] | None = Field(default=None, min_length=1)
    description: str = ""


class OutputSpec(_Spec):
    name: Identifier
    path: str = Field(description="Where the value is in the step's result document, e.g. `.result.data`.")


class StepSpec(_Spec):
    name: Identifier
    agent: Identifier
    description: str = ""
    input: dict[str, Any] | str = Field(
        default_factory=dict, description="The task's input: a mapping (sent as JSON) or a text, with templates."
    )
    output: list[OutputSpec] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn")
    timeout: Duration | None = None
    retries: int | None = Field(default=None, ge=0, le=MAX_RETRIES)


class ErrorHandlingSpec(_Spec):
    on_step_failure: StepFailurePolicy = Field(
        default="fail",
        alias="onStepFailure",
        description="retry: a step without its own `retries` is retried up to `maxRetries` times, then the run "
        "fails; fail: the run fails at the first step that failed for good; continue: the steps after a failed one "
        "are skipped, the others go on, and the run completes.",
    )
    max_retries: int = Field(default=3, ge=0, le=MAX_RETRIES, alias="maxRetries")


class ConcurrencySpec(_Spec):
    max_concurrent: int = Field(
        ge=1, le=10_000, alias="maxConcurrent", description="Runs of this workflow at once, per tenant."
    )
    policy: ConcurrencyPolicy = Field(
        default="queue",
        description="A run beyond the limit: queue (waits for a slot, in order), reject (ends `rejected`), "
        "replace (the oldest running run is cancelled and this one takes its slot).",
    )


class WorkflowSpec(_Spec):
    """What a workflow is: validated strictly, because a typo here should stop start-up, not a run."""

    name: Identifier
    display_name: str = Field(default="", alias="displayName")
    description: str = ""
    input: list[InputSpec] = Field(default_factory=list)
    steps: list[StepSpec] = Field(min_length=1)
    output: dict[str, Any] = Field(default_factory=dict)
    error_handling: ErrorHandlingSpec = Field(default_factory=ErrorHandlingSpec, alias="errorHandling")
    timeout: Duration = DEFAULT_TIMEOUT_SECONDS
    concurrency: ConcurrencySpec | None = None
    budget_usd: float | None = Field(default=None, ge=0, alias="budgetUsd", description="Default budget of one run.")

    def step(self, name: str) -> StepSpec:
        return next(step for step in self.steps if step.name == name)

    def retries_of(self, step: StepSpec) -> int:
        """Further attempts a step gets after a failed one."""
        if step.retries is not None:
            return step.retries
        handling = self.error_handling
        return handling.max_retries if handling.on_step_failure == "retry" else 0

    def info(self) -> WorkflowInfo:
        return WorkflowInfo(
            name=self.name,
            display_name=self.display_name,
            description=self.description,
            inputs=[
                WorkflowInputInfo(
                    name=i.name,
                    type=i.type,
                    required=i.required,
                    default=i.default,
                    enum=i.enum,
                    description=i.description,
                )
                for i in self.input
            ],
            steps=[
                WorkflowStepInfo(
                    name=s.name,
                    agent=s.agent,
                    depends_on=list(s.depends_on),
                    timeout_seconds=s.timeout,
                    retries=self.retries_of(s),
                )
                for s in self.steps
            ],
            outputs=list(self.output),
            timeout_seconds=self.timeout,
            on_step_failure=self.error_handling.on_step_failure,
            max_concurrent=self.concurrency.max_concurrent if self.concurrency else None,
            concurrency_policy=self.concurrency.policy if self.concurrency else None,
            budget_usd=self.budget_usd,
        )


class WorkflowSpecError(ConfigurationError):
    """A workflow file is invalid. The message names the file and the field."""


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def type_matches(kind: InputType, value: Any) -> bool:
    """Whether a JSON value is of a declared input type."""
    match kind:
        case "string":
            return isinstance(value, str)
        case "boolean":
            return isinstance(value, bool)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        case "object":
            return isinstance(value, Mapping)
        case "array":
            return isinstance(value, list)


def resolve_input(spec: WorkflowSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's input: what was given, with defaults filled in. ValueError saying what is wrong."""
    declared = {item.name: item for item in spec.input}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"unknown input {unknown[0]!r}; the workflow declares {sorted(declared)}")
    resolved: dict[str, Any] = {}
    for item in spec.input:
        if item.name in given:
            value = given[item.name]
        elif item.default is not None:
            value = item.default
        elif item.required:
            raise ValueError(f"input {item.name!r} is required")
        else:
            continue
        if not type_matches(item.type, value):
            raise ValueError(f"input {item.name!r} must be {item.type}, got {value!r}")
        if item.enum is not None and value not in item.enum:
            raise ValueError(f"input {item.name!r} must be one of {item.enum}, got {value!r}")
        resolved[item.name] = value
    return resolved


def upstream_of(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Every step's transitive dependencies (the spec must be acyclic)."""
    direct = {step.name: set(step.depends_on) for step in spec.steps}
    found: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in found:
            found[name] = set()
            for dependency in direct[name]:
                found[name] |= {dependency, *visit(dependency)}
        return found[name]

    for name in direct:
        visit(name)
    return found


def _check_dag(spec: WorkflowSpec) -> None:
    names = [step.name for step in spec.steps]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise _FieldError(f"steps[{index}].name", f"step {name!r} is defined twice")
    for index, step in enumerate(spec.steps):
        for position, dependency in enumerate(step.depends_on):
            field = f"steps[{index}].dependsOn[{position}]"
            if dependency == step.name:
                raise _FieldError(field, f"step {step.name!r} depends on itself")
            if dependency not in names:
                raise _FieldError(field, f"unknown step {dependency!r}; steps: {names}")
    state: dict[str, str] = {}
    trail: list[str] = []
    by_name = {step.name: step for step in spec.steps}

    def visit(name: str) -> None:
        state[name] = "visiting"
        trail.append(name)
        for dependency in by_name[name].depends_on:
            if state.get(dependency) == "visiting":
                cycle = [*trail[trail.index(dependency) :], dependency]
                index = names.index(name)
                raise _FieldError(
                    f"steps[{index}].dependsOn", "the steps form a cycle: " + " -> ".join(repr(s) for s in cycle)
                )
            if dependency not in state:
                visit(dependency)
        trail.pop()
        state[name] = "done"

    for name in names:
        if name not in state:
            visit(name)


def _check_inputs(spec: WorkflowSpec) -> None:
    seen: set[str] = set()
    for index, item in enumerate(spec.input):
        if item.name in seen:
            raise _FieldError(f"input[{index}].name", f"input {item.name!r} is declared twice")
        seen.add(item.name)
        for position, allowed in enumerate(item.enum or []):
            if not type_matches(item.type, allowed):
                raise _FieldError(f"input[{index}].enum[{position}]", f"{allowed!r} is not a {item.type}")
        if item.default is not None:
            if not type_matches(item.type, item.default):
                raise _FieldError(f"input[{index}].default", f"{item.default!r} is not a {item.type}")
            if item.enum is not None and item.default not in item.enum:
                raise _FieldError(f"input[{index}].default", f"{item.default!r} is not one of {item.enum}")


def _check_reference(
    spec: WorkflowSpec, reference: Reference, allowed_steps: set[str] | None, field: str, where: str
) -> None:
    if reference.root == "input":
        declared = [item.name for item in spec.input]
        if reference.name not in declared:
            raise _FieldError(field, f"{{{{ {reference} }}}}: the workflow declares no input {reference.name!r}")
        return
    names = [step.name for step in spec.steps]
    if reference.step not in names:
        raise _FieldError(field, f"{{{{ {reference} }}}}: there is no step {reference.step!r}; steps: {names}")
    if allowed_steps is not None and reference.step not in allowed_steps:
        raise _FieldError(
            field,
            f"{{{{ {reference} }}}}: step {reference.step!r} is not upstream of {where} (add it to dependsOn, "
            "directly or through a step it depends on)",
        )
    step = spec.step(str(reference.step))
    outputs = [output.name for output in step.output]
    if reference.name not in outputs:
        raise _FieldError(
            field, f"{{{{ {reference} }}}}: step {reference.step!r} declares no output {reference.name!r}: {outputs}"
        )


def _templated_fields(value: Any, field: str) -> list[tuple[str, Any]]:
    """(field path, string) of every string in a value, so an error can name the exact field."""
    if isinstance(value, str):
        return [(field, value)]
    if isinstance(value, Mapping):
        return [pair for key, item in value.items() for pair in _templated_fields(item, f"{field}.{key}")]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in _templated_fields(item, f"{field}[{index}]")]
    return []


def _check_templates(spec: WorkflowSpec) -> None:
    upstream = upstream_of(spec)
    for index, step in enumerate(spec.steps):
        for position, output in enumerate(step.output):
            field = f"steps[{index}].output[{position}].path"
            try:
                path = split_path(output.path)
            except TemplateError as exc:
                raise _FieldError(field, str(exc)) from exc
            if path[0] != RESULT_ROOT:
                raise _FieldError(
                    field, f"{output.path!r} cannot exist: a step's result document has only .{RESULT_ROOT}"
                )
        names = [output.name for output in step.output]
        for position, name in enumerate(names):
            if name in names[:position]:
                raise _FieldError(f"steps[{index}].output[{position}].name", f"output {name!r} is declared twice")
        for field, text in _templated_fields(step.input, f"steps[{index}].input"):
            try:
                found = references(text)
            except TemplateError as exc:
                raise _FieldError(field, str(exc)) from exc
            for reference in found:
                _check_reference(spec, reference, upstream[step.name], field, f"step {step.name!r}")
    for field, text in _templated_fields(spec.output, "output"):
        try:
            found = references(text)
        except TemplateError as exc:
            raise _FieldError(field, str(exc)) from exc
        for reference in found:
            _check_reference(spec, reference, None, field, "the workflow's output")


def check_workflow(spec: WorkflowSpec, known_agents: set[str]) -> None:
    """Raise _FieldError for the first problem a schema cannot see: the graph, agents, templates, paths."""
    _check_inputs(spec)
    _check_dag(spec)
    for index, step in enumerate(spec.steps):
        if step.agent not in known_agents:
            raise _FieldError(f"steps[{index}].agent", f"unknown agent {step.agent!r}; known: {sorted(known_agents)}")
    _check_templates(spec)


def load_agent_names(directory: Path) -> set[str]:
    """The names of the agents in `directory` (the runner's agent specs, which the runner validates in full)."""
    if not directory.is_dir():
        raise WorkflowSpecError(f"{directory}: agent spec folder does not exist")
    names: set[str] = set()
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise WorkflowSpecError(f"{path}: not valid YAML: {exc}") from exc
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            names.add(raw["name"])
    return names


def load_workflow_specs(directory: Path, known_agents: set[str]) -> dict[str, WorkflowSpec]:
    """Every `*.yaml`/`*.yml` workflow in `directory`, by name (none when the folder is absent). Raises
    WorkflowSpecError on the first bad one."""
    if not directory.is_dir():
        return {}
    specs: dict[str, WorkflowSpec] = {}
    for path in spec_files(directory):
        spec = load_spec(path, WorkflowSpec, WorkflowSpecError)
        try:
            check_workflow(spec, known_agents)
        except _FieldError as exc:
            raise WorkflowSpecError(f"{path}: field '{exc.field}': {exc.message}") from exc
        if spec.name in specs:
            raise WorkflowSpecError(f"{path}: field 'name': workflow {spec.name!r} is defined twice")
        specs[spec.name] = spec
    return specs
