"""Dead letters: a message no handler could process, kept with its error and origin."""

from __future__ import annotations

from datetime import datetime

from agentbus.contracts.common import BusMessage, ErrorInfo, utc_now
from pydantic import Field


class DeadLetter(BusMessage):
    """A message given up on, with why and where from. The original bytes are kept verbatim."""

    stream: str = Field(description="Stream the message came from.")
    consumer: str = Field(description="Durable consumer that gave up on it.")
    subject: str = Field(description="Subject it was published on.")
    stream_seq: int = Field(ge=0, description="Its sequence in the origin stream.")
    deliveries: int = Field(ge=0, description="How many times it was delivered.")
    error: ErrorInfo
    headers: dict[str, str] = Field(default_factory=dict, description="Its NATS headers.")
    payload: str = Field(description="Its payload, decoded as UTF-8 with replacement characters.")
    payload_base64: str = Field(description="Its exact payload bytes, base64.")
    at: datetime = Field(default_factory=utc_now)
