"""List a tenant's approvals for approvers, who may not read the approvals stream themselves: pending ones
(and, on request, resolved ones), oldest first, or one approval by id."""

from __future__ import annotations

from agentbus.contracts.approvals import ApprovalsListReply, ApprovalsListRequest
from agentbus.tool_executor.ports import ExecutorStore
from agentbus.tool_executor.service.messages import approval_entry


class ListApprovals:
    def __init__(self, store: ExecutorStore) -> None:
        self._store = store

    async def __call__(self, tenant: str, request: ApprovalsListRequest) -> ApprovalsListReply:
        found = await self._store.transact(
            lambda ledger: ledger.approvals(
                tenant,
                include_resolved=request.include_resolved,
                approval_id=request.approval_id,
                limit=request.limit,
            )
        )
        return ApprovalsListReply(approvals=[approval_entry(approval) for approval in found])
