"""A stored event history read back from its own subject in a stream: the replay a client asks for.

Task events and workflow-run events are both kept one subject per task or run in a stream that indexes
subjects, so reading one history is the same walk over `get_msg(next=True)` whatever the event type.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import TypeAdapter, ValidationError

MAX_REPLY_BYTES = 512 * 1024
"""A replay reply stays well under NATS's maximum payload; a longer history is read in pages."""


class NumberedEvent(Protocol):
    @property
    def seq(self) -> int: ...


EventT = TypeVar("EventT", bound=NumberedEvent)


class SubjectEventLog(Generic[EventT]):
    """The events stored on one subject of `stream`, decoded with `adapter`, from a sequence number on."""

    def __init__(self, js: JetStreamContext, stream: str, adapter: TypeAdapter[EventT]) -> None:
        self._js = js
        self._stream = stream
        self._adapter = adapter

    async def read(self, subject: str, from_seq: int, limit: int) -> tuple[list[EventT], bool]:
        """Up to `limit` events with seq >= from_seq, and whether more remain past this page."""
        events: list[EventT] = []
        size = 0
        stream_seq = 0
        while True:
            try:
                # The next stored message on this subject after stream_seq (the stream indexes subjects).
                msg = await self._js.get_msg(self._stream, seq=stream_seq + 1, subject=subject, next=True)
            except NotFoundError:
                return events, False
            stream_seq = msg.seq or stream_seq + 1
            try:
                event = self._adapter.validate_json(msg.data or b"")
            except ValidationError:
                continue  # not an event of the contract: nothing a client can read
            if event.seq < from_seq:
                continue
            size += len(msg.data or b"")
            if len(events) >= limit or size > MAX_REPLY_BYTES:
                return events, True
            events.append(event)
