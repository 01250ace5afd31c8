"""Tool definitions: the YAML files in `tools/` that declare every tool with an effect.

One file per tool, or one file per MCP tool server (`kind: mcp`, see `McpServerDefinition`), which
declares several tools. The runner reads them to offer tools to the model (`ToolDefinition.spec()`); the
tool-executor reads them to validate, approve and run calls. A bad file stops start-up with a message
naming the file and the field. Approval rules are kept here as text: the executor parses and evaluates
them (its rule language lives in its domain), so this module stays free of policy semantics.

A file looks like::

    name: create_ticket
    description: Open a support ticket.
    kind: python                      # http | python | shell | retrieval (an MCP server file: mcp)
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
from agentbus.contracts.llm import ToolSpec
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import field_path, read_yaml_mapping, spec_files, validated
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

TOOL_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
APPROVER_PATTERN = re.compile(r"^(group:)?[A-Za-z0-9_-]{1,64}$")
ANY_TENANT = "*"
DEFAULT_EXPIRY_SECONDS = 24 * 3600.0

Kind = Literal["http", "python", "shell", "retrieval", "mcp"]
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


class McpToolHints(BaseModel):
    """The annotations an MCP server gave a tool (hints only: never trusted to lower a risk)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    title: str | None = None
    read_only_hint: bool | None = Field(default=None, alias="readOnlyHint")
    destructive_hint: bool | None = Field(default=None, alias="destructiveHint")
    idempotent_hint: bool | None = Field(default=None, alias="idempotentHint")
    open_world_hint: bool | None = Field(default=None, alias="openWorldHint")


class McpToolBinding(_Strict):
    """Which tool of which MCP server an `mcp` tool calls."""

    server: str
    tool: str = Field(description="The tool's name on the server.")
    hints: McpToolHints | None = None


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
        "idempotency key, python when transactional, mcp as its server's file declares (no by default).",
    )
    http: HttpConfig | None = None
    python: PythonConfig | None = None
    shell: ShellConfig | None = None
    retrieval: RetrievalConfig | None = None
    mcp: McpToolBinding | None = None

    _source: Path | None = PrivateAttr(default=None)
    _fields: str = PrivateAttr(default="")
    """Where this tool's fields are in its file: '' for a tool file, 'tools.<tool>.' in a tool server's."""
    _approval_field: str = PrivateAttr(default="approval")

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
        blocks = {
            "http": self.http,
            "python": self.python,
            "shell": self.shell,
            "retrieval": self.retrieval,
            "mcp": self.mcp,
        }
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
    def reference(self) -> str:
        """How agent specs may name it besides its name: `<server>.<tool>` for an MCP tool."""
        return f"{self.mcp.server}.{self.mcp.tool}" if self.mcp is not None else self.name

    def field(self, path: str) -> str:
        """A field of this tool as its file spells it, for error messages (`approval.rules[0].when` of an MCP
        tool is `tools.<tool>.approval...`, or `defaults.approval...` when it is the server's default)."""
        if path == "approval" or path.startswith(("approval.", "approval[")):
            return self._approval_field + path.removeprefix("approval")
        return self._fields + path

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


# --- MCP tool servers -------------------------------------------------------------------------------

MCP_SERVER_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*$"
"""Letters and digits, single underscores between them: `<server>__<tool>` then splits one way only."""
MCP_TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
MCP_NAME_SEPARATOR = "__"


class McpStdioTransport(_Strict):
    """A server run by the executor as a child process, spoken to over its stdin and stdout.

    It runs like a `shell` tool: its own session and process group, resource limits, a temporary working
    folder and an environment built from scratch (PATH, HOME, the locale, `env`, and `secret_env`). In
    `command` and `args`, `{python}` is the executor's own interpreter and `{dir}` the folder of this file.
    """

    type: Literal["stdio"]
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Variables the server sees, as given.")
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="Variables the server sees, each read from the named variable of the executor's environment.",
    )
    max_memory_mb: int = Field(default=1024, ge=64, description="Address-space limit of the server process.")
    max_file_size_mb: int = Field(default=64, ge=1)
    max_open_files: int = Field(default=256, ge=16)

    @field_validator("env", "secret_env")
    @classmethod
    def _variable_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value


class McpHttpTransport(_Strict):
    """A server reached over MCP's streamable HTTP transport."""

    type: Literal["streamable-http"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str | SecretHeader] = Field(default_factory=dict)


class McpToolSettings(_Strict):
    """One tool of the server: what the model is offered (pinned from the server's own listing) and how
    agentbus treats it (each setting falls back to the server's `defaults`)."""

    description: str = Field(min_length=1, description="Pinned: what the model reads.")
    parameters: dict[str, Any] = Field(description="Pinned: the tool's input schema (JSON Schema, type object).")
    annotations: McpToolHints | None = Field(default=None, description="Pinned: the server's hints.")
    alias: str | None = Field(
        default=None, pattern=TOOL_NAME_PATTERN, description="The name the model sees; default `<server>__<tool>`."
    )
    risk: Risk | None = None
    idempotent: bool | None = None
    retries: int | None = Field(default=None, ge=0, le=10)
    timeout_seconds: float | None = Field(default=None, gt=0, le=3600)
    approval: ApprovalPolicy | None = None


class McpServerDefaults(_Strict):
    """What a tool of the server gets when it says nothing itself."""

    approval: ApprovalPolicy = Field(description="Required: a server says how its calls are approved.")
    risk: Risk | None = Field(
        default=None, description="Absent: from the tool's annotations (read-only low, destructive high; none: high)."
    )
    idempotent: bool = Field(
        default=False, description="A call interrupted before its outcome was recorded may run again."
    )
    retries: int = Field(default=0, ge=0, le=10)


class McpServerDefinition(_Strict):
    """An MCP tool server (`kind: mcp`): how to reach it, and the tools of it that agents may use.

    Each exposed tool becomes a `ToolDefinition` of kind `mcp`, named `<server>__<tool>` (or its alias) for
    the model, and `<server>.<tool>` in agent specs. Its description and input schema are pinned in this
    file: they are what the model is offered, whatever the server says later, and the executor compares
    them with the server's own listing when it connects and whenever the server says its list changed.
    """

    name: str = Field(pattern=MCP_SERVER_NAME_PATTERN, max_length=32)
    kind: Literal["mcp"]
    description: str = ""
    transport: McpStdioTransport | McpHttpTransport = Field(discriminator="type")
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="Default time limit of one call.")
    probe_every_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How often an idle connection lists the server's tools: it finds a server that stopped "
        "answering, and a tool list that changed without the server saying so.",
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="The largest message accepted from the server; a larger one fails its call, contained.",
    )
    expose: Literal["all"] | list[str] = Field(default="all", description="Tools under `tools` agents may use.")
    defaults: McpServerDefaults
    tools: dict[str, McpToolSettings] = Field(min_length=1)

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, value: dict[str, McpToolSettings]) -> dict[str, McpToolSettings]:
        for name in value:
            if not re.fullmatch(MCP_TOOL_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not an MCP tool name")
        return value

    @model_validator(mode="after")
    def _exposed_are_declared(self) -> McpServerDefinition:
        if self.expose != "all":
            unknown = [name for name in self.expose if name not in self.tools]
            if unknown:
                raise ValueError(f"expose names {unknown} that are not declared under 'tools'")
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def exposed(self) -> list[str]:
        return list(self.tools) if self.expose == "all" else list(self.expose)

    def tool_name(self, tool: str) -> str:
        """The name the model sees for one of its tools."""
        alias = self.tools[tool].alias
        return alias or f"{self.name}{MCP_NAME_SEPARATOR}{re.sub(r'[^A-Za-z0-9_]', '_', tool)}"

    def definitions(self) -> list[ToolDefinition]:
        """Its exposed tools as tool definitions. Raises ToolDefinitionError naming the file and the field."""
        return [self._definition(tool) for tool in self.exposed]

    def _definition(self, tool: str) -> ToolDefinition:
        settings = self.tools[tool]
        where = f"tools.{tool}."
        name = self.tool_name(tool)
        if not re.fullmatch(TOOL_NAME_PATTERN, name):
            raise ToolDefinitionError(
                f"{self._source}: field '{where}alias': {name!r} is not a tool name a model accepts (a letter, then "
                "letters, digits and '_', at most 64): give the tool an alias"
            )
        try:
            definition = ToolDefinition(
                name=name,
                description=settings.description,
                kind="mcp",
                parameters=settings.parameters,
                risk=mcp_tool_risk(settings.risk or self.defaults.risk, settings.annotations),
                approval=settings.approval or self.defaults.approval,
                timeout_seconds=settings.timeout_seconds or self.timeout_seconds,
                retries=settings.retries if settings.retries is not None else self.defaults.retries,
                idempotent=settings.idempotent if settings.idempotent is not None else self.defaults.idempotent,
                mcp=McpToolBinding(server=self.name, tool=tool, hints=settings.annotations),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            location = where + field_path(first["loc"])
            raise ToolDefinitionError(f"{self._source}: field '{location}': {first['msg']}") from exc
        definition._source = self._source
        definition._fields = where
        definition._approval_field = where + "approval" if settings.approval is not None else "defaults.approval"
        return definition


def mcp_tool_risk(declared: Risk | None, hints: McpToolHints | None) -> Risk:
    """A tool's risk: what its file declares, raised (never lowered) by what its annotations say.

    With nothing declared, the annotations decide: read-only is low, explicitly not destructive medium,
    anything else high (MCP's own default for a tool is "may be destructive"). Annotations come from the
    server and are not trusted, so they can only make a tool riskier than declared.
    """
    implied: Risk | None = None
    if hints is not None:
        if hints.read_only_hint:
            implied = "low"
        elif hints.destructive_hint is False:
            implied = "medium"
        elif hints.destructive_hint:
            implied = "high"
    if declared is None:
        return implied or "high"
    if implied is None or RISK_ORDER.index(implied) <= RISK_ORDER.index(declared):
        return declared
    return implied


# --- loading ---------------------------------------------------------------------------------------


def _read_mapping(path: Path) -> dict[str, Any]:
    raw = read_yaml_mapping(path, ToolDefinitionError)
    if raw is None:
        raise ToolDefinitionError(f"{path}: expected a mapping of fields, got an empty file")
    return raw


def _validated(path: Path, raw: dict[str, Any]) -> ToolDefinition | McpServerDefinition:
    model: type[ToolDefinition] | type[McpServerDefinition] = (
        McpServerDefinition if raw.get("kind") == "mcp" else ToolDefinition
    )
    loaded = validated(model, raw, path, ToolDefinitionError)
    loaded._source = path
    return loaded


def load_tool_definition(path: Path) -> ToolDefinition:
    """Read one tool file. Raises ToolDefinitionError naming the file and the field."""
    loaded = _validated(path, _read_mapping(path))
    if isinstance(loaded, McpServerDefinition):
        raise ToolDefinitionError(f"{path}: is a tool server (kind 'mcp'), not one tool: load its folder")
    return loaded


def load_tool_file(path: Path) -> ToolDefinition | McpServerDefinition:
    """Read one file of the tools folder: a tool, or an MCP tool server."""
    return _validated(path, _read_mapping(path))


def _tool_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ToolDefinitionError(f"{directory}: tool folder does not exist")
    return spec_files(directory)


def load_mcp_servers(directory: Path) -> dict[str, McpServerDefinition]:
    """The MCP tool servers (`kind: mcp` files) of a tools folder, by name."""
    servers: dict[str, McpServerDefinition] = {}
    for path in _tool_files(directory):
        loaded = load_tool_file(path)
        if isinstance(loaded, McpServerDefinition):
            if loaded.name in servers:
                raise ToolDefinitionError(
                    f"{path}: field 'name': tool server {loaded.name!r} is already defined in "
                    f"{servers[loaded.name].source}"
                )
            servers[loaded.name] = loaded
    return servers


def load_tool_definitions(directory: Path) -> dict[str, ToolDefinition]:
    """Every tool of the `*.yaml`/`*.yml` files in `directory`, by every name an agent spec may give it: its
    name, and for an MCP tool also `<server>.<tool>`. Raises ToolDefinitionError on the first bad file.

    A missing folder is an error; an empty folder means no tools.
    """
    tools: dict[str, ToolDefinition] = {}
    for path in _tool_files(directory):
        loaded = load_tool_file(path)
        definitions = loaded.definitions() if isinstance(loaded, McpServerDefinition) else [loaded]
        for definition in definitions:
            for key in dict.fromkeys((definition.name, definition.reference)):
                if key in tools:
                    raise ToolDefinitionError(
                        f"{path}: field '{definition.field('name')}': tool {key!r} is already defined in "
                        f"{tools[key].source}"
                    )
                tools[key] = definition
    return tools


def distinct_tools(tools: dict[str, ToolDefinition]) -> list[ToolDefinition]:
    """Each tool of `load_tool_definitions` once (an MCP tool is there under two names), by name."""
    return sorted({definition.name: definition for definition in tools.values()}.values(), key=lambda d: d.name)
