"""Agent specs: YAML files in `agents/` naming an agent's model, prompt, tools, step limit, budget and guardrails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agentbus.contracts.common import Identifier
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import load_spec, spec_files
from pydantic import BaseModel, ConfigDict, Field


class AgentSpec(BaseModel):
    """What an agent is: validated strictly, because a typo here should stop start-up, not a task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    description: str = ""
    model: Identifier = Field(description="Model routing name: the inference subject token.")
    system_prompt: str = Field(min_length=1)
    tools: list[str] = Field(default_factory=list)
    max_steps: int = Field(default=8, ge=1, le=100, description="Most LLM steps one run may take.")
    budget_usd: float | None = Field(default=None, ge=0, description="Default budget of one task.")
    stream_tokens: bool = Field(default=False, description="Stream generated text as `token` events.")
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="Deadline of one task from acceptance (a submission's deadline_seconds overrides it); the "
        "runner's default when absent.",
    )
    memory: Identifier | None = Field(
        default=None,
        description="The memory store (`memory/*.yaml`) of its sessions and long-term memory; without one, a "
        "submission naming a session is rejected `session_unsupported`.",
    )
    session_tool_results: bool = Field(
        default=False,
        description="Keep its tool calls and results in a session's history, besides inputs and answers.",
    )
    guardrails: list[str] = Field(
        default_factory=list,
        description="Guardrail policies (`config/guardrails.yaml`) applied, in order, to its task input, each tool "
        "call's arguments and the model's output.",
    )


class AgentSpecError(ConfigurationError):
    """A spec file is invalid. The message names the file and the field."""


SpecCheck = Callable[[AgentSpec], tuple[str, str] | None]
"""A further check of a valid spec: None, or the field at fault and why."""


def load_agent_specs(directory: Path, known_tools: set[str], check: SpecCheck | None = None) -> dict[str, AgentSpec]:
    """Every `*.yaml`/`*.yml` spec in `directory`, by name. Raises AgentSpecError on the first bad one."""
    if not directory.is_dir():
        raise AgentSpecError(f"{directory}: agent spec folder does not exist")
    specs: dict[str, AgentSpec] = {}
    for path in spec_files(directory):
        spec = load_spec(path, AgentSpec, AgentSpecError)
        for index, tool in enumerate(spec.tools):
            if tool not in known_tools:
                raise AgentSpecError(
                    f"{path}: field 'tools[{index}]': unknown tool {tool!r}; known: {sorted(known_tools)}"
                )
        if check is not None and (fault := check(spec)) is not None:
            raise AgentSpecError(f"{path}: field '{fault[0]}': {fault[1]}")
        if spec.name in specs:
            raise AgentSpecError(f"{path}: field 'name': agent {spec.name!r} is defined twice")
        specs[spec.name] = spec
    if not specs:
        raise AgentSpecError(f"{directory}: no agent spec files (*.yaml)")
    return specs
