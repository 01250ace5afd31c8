"""A run's stored events, read from its subject in the workflow-events stream."""

from __future__ import annotations

from agentbus.contracts.registry import WORKFLOW_EVENT, WORKFLOW_EVENTS
from agentbus.contracts.workflows import WORKFLOW_EVENT_ADAPTER, WorkflowEventKind
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

MAX_REPLY_BYTES = 512 * 1024
"""A replay reply stays well under NATS's maximum payload; a longer history is read in pages."""


class NatsEventLog:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def events(self, tenant: str, run_id: str, from_seq: int, limit: int) -> tuple[list[WorkflowEventKind], bool]:
        subject = WORKFLOW_EVENT.format(tenant=tenant, run_id=run_id)
        events: list[WorkflowEventKind] = []
        size = 0
        stream_seq = 0
        while True:
            try:
                # The next stored message on this subject after stream_seq (the stream indexes subjects).
                msg = await self._js.get_msg(WORKFLOW_EVENTS.name, seq=stream_seq + 1, subject=subject, next=True)
            except NotFoundError:
                return events, False
            stream_seq = msg.seq or stream_seq + 1
            try:
                event = WORKFLOW_EVENT_ADAPTER.validate_json(msg.data or b"")
            except ValidationError:
                continue  # not an event of the contract: nothing a client can read
            if event.seq < from_seq:
                continue
            size += len(msg.data or b"")
            if len(events) >= limit or size > MAX_REPLY_BYTES:
                return events, True
            events.append(event)
