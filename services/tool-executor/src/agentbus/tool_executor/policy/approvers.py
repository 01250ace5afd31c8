"""Who may decide: approvers named in a tool's policy, directly or through the groups of the approvers file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agentbus.runtime.tool_registry import ANY_TENANT, ApprovalPolicy


@dataclass(frozen=True)
class ApproverDirectory:
    """Approver groups per tenant; groups under '*' apply to every tenant."""

    groups: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)

    def members(self, tenant: str, group: str) -> frozenset[str]:
        shared = self.groups.get(ANY_TENANT, {}).get(group, frozenset())
        return shared | self.groups.get(tenant, {}).get(group, frozenset())

    def group_defined(self, tenant: str, group: str) -> bool:
        if tenant == ANY_TENANT:
            return any(group in groups for groups in self.groups.values())
        return group in self.groups.get(ANY_TENANT, {}) or group in self.groups.get(tenant, {})

    def may_approve(self, policy: ApprovalPolicy, tenant: str, approver: str) -> bool:
        """Whether `approver` is named, directly or through a group, for this tenant or for every tenant."""
        entries = [*policy.approvers.get(ANY_TENANT, []), *policy.approvers.get(tenant, [])]
        for entry in entries:
            if entry.startswith("group:"):
                if approver in self.members(tenant, entry.removeprefix("group:")):
                    return True
            elif entry == approver:
                return True
        return False
