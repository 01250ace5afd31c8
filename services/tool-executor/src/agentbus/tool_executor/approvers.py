"""The approvers file: who belongs to which approver group, per tenant.

    # config/approvers.yaml
    groups:
      "*":                 # groups every tenant shares
        platform-oncall: [dana]
      acme:
        ops-leads: [alice, bob]

Tool files name approvers per tenant as ids (`alice`) or groups (`group:ops-leads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import field_path
from agentbus.runtime.tool_registry import ANY_TENANT, ToolDefinition
from agentbus.tool_executor.policy import ApproverDirectory
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

_Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_TenantKey = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9_-]{1,64})$")]


class ApproversFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: dict[_TenantKey, dict[_Id, list[_Id]]] = Field(default_factory=dict)


class ApproversFileError(ConfigurationError):
    """The approvers file is invalid, or a tool names a group it does not define."""


def load_approvers(path: Path) -> ApproverDirectory:
    """Read the approvers file. Raises ApproversFileError naming the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ApproversFileError(f"{path}: cannot read the approvers file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ApproversFileError(f"{path}: not valid YAML: {exc}") from exc
    try:
        parsed = ApproversFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApproversFileError(f"{path}: field '{field_path(first['loc'])}': {first['msg']}") from exc
    return ApproverDirectory(
        {
            tenant: {group: frozenset(members) for group, members in groups.items()}
            for tenant, groups in parsed.groups.items()
        }
    )


def check_groups(definition: ToolDefinition, directory: ApproverDirectory, approvers_file: Path) -> None:
    """Every `group:<name>` a tool names must exist in the approvers file, for that tenant or for '*'."""
    for tenant, entries in definition.approval.approvers.items():
        for index, entry in enumerate(entries):
            group = entry.removeprefix("group:")
            if entry.startswith("group:") and not directory.group_defined(tenant, group):
                scope = "any tenant" if tenant == ANY_TENANT else f"tenant {tenant!r} or '*'"
                raise ApproversFileError(
                    f"{definition.source}: field '{definition.field(f'approval.approvers.{tenant}[{index}]')}': "
                    f"group {group!r} is not "
                    f"defined for {scope} in {approvers_file}"
                )
