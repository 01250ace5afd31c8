"""W3C trace context (`traceparent`) carried in NATS headers across every hop."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _hex_id(bits: int) -> str:
    # Trace and span ids need uniqueness, not secrecy: a PRNG, as OpenTelemetry's SDK uses, and no syscall.
    return f"{random.getrandbits(bits):0{bits // 4}x}"


@dataclass(frozen=True)
class TraceContext:
    """A position in a trace: the trace id and the id of the current span."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        """The header value."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """A new span in the same trace, whose parent is this one."""
        return TraceContext(self.trace_id, _hex_id(64), self.flags)

    @staticmethod
    def in_trace(trace_id: str) -> TraceContext:
        """A new span of an existing trace."""
        return TraceContext(trace_id, _hex_id(64))

    @staticmethod
    def new() -> TraceContext:
        """The root of a new trace."""
        return TraceContext(_hex_id(128), _hex_id(64))

    @staticmethod
    def parse(header: str | None) -> TraceContext | None:
        """The context of a `traceparent` header, or None when absent or malformed."""
        if not header:
            return None
        match = _TRACEPARENT.match(header.strip().lower())
        if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
            return None
        return TraceContext(match.group(1), match.group(2), match.group(3))
