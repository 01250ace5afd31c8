"""Tool definitions: the YAML files in `tools/` that declare every tool with an effect.

One file per tool. The runner reads them to offer tools to the model (`ToolDefinition.spec()`); the
tool-executor reads them to validate, approve and run calls. A bad file stops start-up with a message
naming the file and the field. Approval rules are kept here as text: the executor parses and evaluates
them (its rule language lives in its domain), so this module stays free of policy semantics.

A file looks like::

    name: create_ticket
    description: Open a support ticket.
    kind: python                      # http | python | shell | retrieval
    risk: medium                      # low | medium | high | critical
    parameters: {type: object, properties: {...}, required: [...]}
    approval:
      policy: rules                   # never | always | rules
      rules:
        - when: 'priority == "high"'
          reason: High-priority tickets page the on-call engineer.
      approvers: {"*": ["group:ops-leads"], acme: [alice]}
      allow_self_approval: false
      expires_after_seconds: 86400
    timeout_seconds: 30
    retries: 1
    python: {callable: "agentbus.tool_executor.builtins.tickets:create_ticket", transactional: true}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml
from agentbus.contracts.llm import ToolSpec
from agentbus.runtime.errors import ConfigurationError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

TOOL_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
APPROVER_PATTERN = re.compile(r"^(group:)?[A-Za-z0-9_-]{1,64}$")
ANY_TENANT = "*"
DEFAULT_EXPIRY_SECONDS = 24 * 3600.0

Kind = Literal["http", "python", "shell", "retrieval"]
Risk = Literal["low", "medium", "high", "critical"]
RISK_ORDER: tuple[Risk, ...] = ("low", "medium", "high", "critical")


class ToolDefinitionError(ConfigurationError):
    """A tool file is invalid. The message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApprovalRule(_Strict):
    """Ask for approval when `when` holds for the call's arguments (and the tool's `risk`)."""

    when: str = Field(min_length=1, description='A condition, e.g. `priority == "high"`.')
    reason: str | None = Field(default=None, description="Shown to approvers; defaults to the condition.")
    risk: Risk | None = Field(default=None, description="Raises the risk shown for calls this rule catches.")


class ApprovalPolicy(_Strict):
    """Whether a call waits for a human, who may decide, and for how long."""

    policy: Literal["never", "always", "rules"] = "never"
    rules: list[ApprovalRule] = Field(default_factory=list, description="policy=rules: the first that holds applies.")
    reason: str | None = Field(default=None, description="policy=always: why, shown to approvers.")
    approvers: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per tenant ('*' for any tenant): approver ids, or 'group:<name>' from the approvers file.",
    )
    allow_self_approval: bool = Field(default=False, description="Whether the task's submitter may approve it.")
    expires_after_seconds: float = Field(default=DEFAULT_EXPIRY_SECONDS, gt=0, le=90 * 86400)

    @field_validator("approvers")
    @classmethod
    def _approver_ids(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for tenant, entries in value.items():
            if tenant != ANY_TENANT and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant):
                raise ValueError(f"tenant {tenant!r} is not an identifier or '*'")
            for entry in entries:
                if not APPROVER_PATTERN.fullmatch(entry):
                    raise ValueError(f"approver {entry!r} is neither an id nor 'group:<name>'")
        return value

    @model_validator(mode="after")
    def _rules_only_with_rules(self) -> ApprovalPolicy:
        if self.policy == "rules" and not self.rules:
            raise ValueError("policy 'rules' needs at least one rule")
        if self.policy != "rules" and self.rules:
            raise ValueError(f"rules are only read with policy 'rules', not {self.policy!r}")
        return self


class SecretHeader(_Strict):
    """A header whose value comes from an environment variable of the executor, read when the call runs."""

    secret_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    prefix: str = Field(default="", description="Put before the secret, e.g. 'Bearer '.")


class HttpConfig(_Strict):
    """An HTTP endpoint. `{name}` in the URL is replaced by that argument, URL-encoded."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str | SecretHeader] = Field(default_factory=dict)
    send_idempotency_key: bool = Field(
        default=False, description="Send `Idempotency-Key: <call_id>`; the endpoint then makes a re-run safe."
    )


class PythonConfig(_Strict):
    """A built-in callable, `module.path:function`."""

    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    transactional: bool = Field(
        default=False, description="Its effect commits in the executor's ledger transaction: a re-run is safe."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the callable.")


class ShellConfig(_Strict):
    """A command run in a sandbox: own process group, resource limits, a clean environment."""

    command: list[str] = Field(min_length=1, description="argv; `{name}` is replaced by that argument.")
    env: dict[str, str] = Field(default_factory=dict, description="The only variables the command sees (+PATH).")
    max_memory_mb: int = Field(default=512, ge=16)
    max_output_bytes: int = Field(default=64 * 1024, ge=256)
    max_file_size_mb: int = Field(default=64, ge=1)


class RetrievalConfig(_Strict):
    """A knowledge-base search through the retriever."""

    query_argument: str = Field(default="query", description="The argument holding the query text.")
    top_k: int = Field(default=5, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class ToolDefinition(_Strict):
    """One tool: what the model sees, how it runs, and whether it waits for a human."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = Field(min_length=1)
    kind: Kind
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments object.")
    risk: Risk = "low"
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    retries: int = Field(default=0, ge=0, le=10, description="Extra attempts after a transient failure.")
    idempotent: bool | None = Field(
        default=None,
        description="Running it again is harmless. Defaults: retrieval yes, shell no, http when it sends an "
        "idempotency key, python when transactional.",
    )
    http: HttpConfig | None = None
    python: PythonConfig | None = None
    shell: ShellConfig | None = None
    retrieval: RetrievalConfig | None = None

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
        if value.get("type") != "object":
            raise ValueError("the arguments schema must have type 'object'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_kind_block(cls, data: Any) -> Any:
        # A retrieval tool needs no settings of its own: its block may be left out.
        if isinstance(data, dict) and data.get("kind") == "retrieval" and data.get("retrieval") is None:
            return {**data, "retrieval": {}}
        return data

    @model_validator(mode="after")
    def _one_block_for_its_kind(self) -> ToolDefinition:
        blocks = {"http": self.http, "python": self.python, "shell": self.shell, "retrieval": self.retrieval}
        if blocks[self.kind] is None:
            raise ValueError(f"kind {self.kind!r} needs a '{self.kind}' block")
        others = sorted(name for name, block in blocks.items() if block is not None and name != self.kind)
        if others:
            raise ValueError(f"kind {self.kind!r} takes no {', '.join(repr(o) for o in others)} block")
        return self

    @property
    def source(self) -> Path | None:
        """The file the definition was read from, for error messages."""
        return self._source

    @property
    def rerun_safe(self) -> bool:
        """Whether an execution interrupted before its outcome was recorded may simply run again."""
        if self.idempotent is not None:
            return self.idempotent
        if self.kind == "retrieval":
            return True
        if self.kind == "python":
            return self.python is not None and self.python.transactional
        if self.kind == "http":
            return self.http is not None and self.http.send_idempotency_key
        return False

    def spec(self) -> ToolSpec:
        """The tool as offered to the model."""
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)


def field_path(location: tuple[int | str, ...]) -> str:
    """`approval.rules[0].when` from a pydantic error location."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def load_tool_definition(path: Path) -> ToolDefinition:
    """Read one tool file. Raises ToolDefinitionError naming the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolDefinitionError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ToolDefinitionError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ToolDefinitionError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        definition = ToolDefinition.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ToolDefinitionError(f"{path}: field '{field_path(first['loc'])}': {first['msg']}") from exc
    definition._source = path
    return definition


def load_tool_definitions(directory: Path) -> dict[str, ToolDefinition]:
    """Every `*.yaml`/`*.yml` tool in `directory`, by name. Raises ToolDefinitionError on the first bad one.

    A missing folder is an error; an empty folder means no tools.
    """
    if not directory.is_dir():
        raise ToolDefinitionError(f"{directory}: tool folder does not exist")
    tools: dict[str, ToolDefinition] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        definition = load_tool_definition(path)
        if definition.name in tools:
            raise ToolDefinitionError(
                f"{path}: field 'name': tool {definition.name!r} is already defined in {tools[definition.name].source}"
            )
        tools[definition.name] = definition
    return tools
