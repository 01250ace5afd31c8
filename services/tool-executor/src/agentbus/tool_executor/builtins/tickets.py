"""`create_ticket`: opens a ticket in the executor's own database.

The ticket is written through the ledger's open transaction (`transactional: true` in its tool file), so it
commits together with the call's outcome or not at all: an execution interrupted before its commit left no
ticket, and running it again is safe. The ticket id derives from the call id, so one call is one ticket.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from agentbus.tool_executor.adapters.runners import PythonToolContext, ToolFailedError
from agentbus.tool_executor.adapters.schema import tickets
from agentbus.tool_executor.ports import ToolOutput


def ticket_id_for(call_id: str) -> str:
    return "TCK-" + hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:10].upper()


async def create_ticket(arguments: dict[str, Any], context: PythonToolContext) -> ToolOutput:
    if context.connection is None:
        raise ToolFailedError("misconfigured", "create_ticket must be declared transactional")
    invocation = context.invocation
    ticket_id = ticket_id_for(invocation.call_id)
    await context.connection.execute(
        tickets.insert().values(
            ticket_id=ticket_id,
            call_id=invocation.call_id,
            tenant=invocation.tenant,
            task_id=invocation.task_id,
            title=arguments["title"],
            priority=arguments.get("priority", "medium"),
            description=arguments.get("description", ""),
            created_at=datetime.now(UTC),
        )
    )
    return ToolOutput(True, f"Created ticket {ticket_id} ({arguments.get('priority', 'medium')}): {arguments['title']}")
