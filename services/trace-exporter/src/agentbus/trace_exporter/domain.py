"""Pure rules: how a span event becomes an exported span that Langfuse reads as part of one trace per task.

Langfuse's OTLP ingestion (checked against its OtelIngestionProcessor and ObservationTypeMapper) reads:
- the observation type from `langfuse.observation.type` (span, generation, agent, tool, chain, retriever, ...);
- trace-level fields from ANY span that carries them (`langfuse.trace.name`, `session.id`/`langfuse.session.id`,
  `user.id`/`langfuse.user.id`, `langfuse.trace.tags`, `langfuse.trace.input`/`output`), merged by trace id, and
  the trace name from a root span (no parent) when no span names it. Spans of one task come from several
  services over hours, so every span carries the trace fields it knows: nothing waits for the root;
- usage from `langfuse.observation.usage_details` (a JSON object) and cost from
  `langfuse.observation.cost_details` (a JSON object; `gen_ai.usage.cost` is read as its total);
- the model from `langfuse.observation.model.name` or `gen_ai.request.model`;
- input/output from `langfuse.observation.input`/`output`; the level ERROR from the OTLP status code.
Any other attribute ends up in the observation's metadata.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from agentbus.contracts.spans import SpanKind, SpanRecorded
from agentbus.runtime.spans import SpanAttribute

AttributeValue = str | bool | int | float | list[str]

REDACTED = "[REDACTED]"
COST_ATTRIBUTE_ALIASES: tuple[str, ...] = (SpanAttribute.COST_USD, "cost_usd")
"""Where a generation's cost in USD may be: the runner sets `gen_ai.usage.cost` once the accountant priced it."""

_INT64_MAX = 2**63 - 1


class LangfuseAttribute(StrEnum):
    """The OTLP span attributes Langfuse maps onto traces and observations."""

    TRACE_NAME = "langfuse.trace.name"
    SESSION_ID = "session.id"
    LANGFUSE_SESSION_ID = "langfuse.session.id"
    USER_ID = "user.id"
    LANGFUSE_USER_ID = "langfuse.user.id"
    TRACE_TAGS = "langfuse.trace.tags"
    TRACE_INPUT = "langfuse.trace.input"
    TRACE_OUTPUT = "langfuse.trace.output"
    OBSERVATION_TYPE = "langfuse.observation.type"
    OBSERVATION_INPUT = "langfuse.observation.input"
    OBSERVATION_OUTPUT = "langfuse.observation.output"
    LEVEL = "langfuse.observation.level"
    STATUS_MESSAGE = "langfuse.observation.status_message"
    MODEL = "langfuse.observation.model.name"
    USAGE_DETAILS = "langfuse.observation.usage_details"
    COST_DETAILS = "langfuse.observation.cost_details"
    ENVIRONMENT = "langfuse.environment"


OBSERVATION_TYPES: Mapping[str, str] = {
    "task": "agent",
    "agent_step": "chain",
    "generation": "generation",
    "tool": "tool",
    "retrieval": "retriever",
    "approval_wait": "span",
}
"""Langfuse observation type of each span kind. An approval wait is a plain span: a person, not a component."""

# Attributes the mapping consumes itself; everything else passes through as metadata.
_MAPPED = frozenset(
    {
        SpanAttribute.INPUT,
        SpanAttribute.OUTPUT,
        SpanAttribute.AGENT,
        SpanAttribute.USER,
        SpanAttribute.MODEL,
        SpanAttribute.INPUT_TOKENS,
        SpanAttribute.OUTPUT_TOKENS,
        *COST_ATTRIBUTE_ALIASES,
    }
)


class Redactor:
    """Replaces configured secret patterns with [REDACTED], then cuts text to `max_chars`."""

    def __init__(self, patterns: Sequence[str], max_chars: int) -> None:
        # Compiled one by one: a pattern may carry its own global flags, such as (?i).
        self._patterns = [re.compile(p) for p in patterns]
        self._max_chars = max_chars

    def text(self, value: str) -> str:
        """The value with secrets replaced, truncated with a note of how much was cut."""
        for pattern in self._patterns:
            value = pattern.sub(REDACTED, value)
        if len(value) > self._max_chars:
            cut = len(value) - self._max_chars
            value = f"{value[: self._max_chars]}... [truncated {cut} chars]"
        return value

    def value(self, value: Any) -> str:
        """Any JSON-able value as redacted, truncated text (non-strings as JSON)."""
        if not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
        return self.text(value)


@dataclass(frozen=True)
class TraceIdentity:
    """What names a trace: its agent (the trace name) and its submitter (the trace's user)."""

    agent: str | None = None
    user: str | None = None

    def merged(self, other: TraceIdentity) -> TraceIdentity:
        return TraceIdentity(agent=self.agent or other.agent, user=self.user or other.user)


def identity_of(span: SpanRecorded) -> TraceIdentity:
    """The trace identity a span itself knows."""
    agent = span.attributes.get(SpanAttribute.AGENT)
    user = span.attributes.get(SpanAttribute.USER)
    return TraceIdentity(
        agent=str(agent) if agent not in (None, "") else None,
        user=str(user) if user not in (None, "") else None,
    )


class TraceDirectory:
    """Remembers each recent trace's identity, so spans that do not know their agent still name the trace.

    Bounded (least recently used traces are forgotten); losing it on restart only means that spans
    exported later carry fewer trace fields, which Langfuse already has from earlier spans.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._known: OrderedDict[str, TraceIdentity] = OrderedDict()

    def learn(self, span: SpanRecorded) -> TraceIdentity:
        """Merge what this span knows into its trace's identity, and return the identity."""
        identity = identity_of(span).merged(self._known.get(span.trace_id, TraceIdentity()))
        if identity.agent or identity.user:
            self._known[span.trace_id] = identity
            self._known.move_to_end(span.trace_id)
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)
        return identity


@dataclass(frozen=True)
class ExportSpan:
    """A span as exported: its identity and timing, and the attributes Langfuse reads."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: SpanKind
    service: str
    start: datetime
    end: datetime
    status: str
    status_message: str | None
    attributes: dict[str, AttributeValue]

    def to_json(self) -> dict[str, Any]:
        """The JSONL record of this span."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "status": self.status,
            "status_message": self.status_message,
            "attributes": self.attributes,
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _attribute(value: Any, redactor: Redactor) -> AttributeValue | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT64_MAX - 1 <= value <= _INT64_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return redactor.value(value)


def to_export_span(
    span: SpanRecorded, identity: TraceIdentity, redactor: Redactor, environment: str | None = None
) -> ExportSpan:
    """Map a span event onto Langfuse's attributes: trace fields, observation type, usage, cost, input/output."""
    source = span.attributes
    attributes: dict[str, AttributeValue] = {
        LangfuseAttribute.OBSERVATION_TYPE: OBSERVATION_TYPES[span.kind],
        "agentbus.kind": span.kind,
        "agentbus.service": span.service,
    }
    if environment:
        attributes[LangfuseAttribute.ENVIRONMENT] = environment
    # Trace-level fields on every span: the spans of one task arrive from several services, in any order.
    if identity.agent:
        attributes[LangfuseAttribute.TRACE_NAME] = identity.agent
        attributes[SpanAttribute.AGENT] = identity.agent
    if identity.user:
        attributes[LangfuseAttribute.USER_ID] = identity.user
        attributes[LangfuseAttribute.LANGFUSE_USER_ID] = identity.user
    if span.task_id:
        attributes[LangfuseAttribute.SESSION_ID] = span.task_id
        attributes[LangfuseAttribute.LANGFUSE_SESSION_ID] = span.task_id
        attributes["agentbus.task_id"] = span.task_id
    if span.tenant:
        attributes[LangfuseAttribute.TRACE_TAGS] = [f"tenant:{span.tenant}"]
        attributes["agentbus.tenant"] = span.tenant

    for key, observation_key, trace_key in (
        (SpanAttribute.INPUT, LangfuseAttribute.OBSERVATION_INPUT, LangfuseAttribute.TRACE_INPUT),
        (SpanAttribute.OUTPUT, LangfuseAttribute.OBSERVATION_OUTPUT, LangfuseAttribute.TRACE_OUTPUT),
    ):
        if source.get(key) is not None:
            text = redactor.value(source[key])
            attributes[observation_key] = text
            if span.kind == "task":
                attributes[trace_key] = text

    if span.kind == "generation":
        model = source.get(SpanAttribute.MODEL)
        if model not in (None, ""):
            attributes[SpanAttribute.MODEL] = str(model)
            attributes[LangfuseAttribute.MODEL] = str(model)
        usage: dict[str, int] = {}
        for key, name in ((SpanAttribute.INPUT_TOKENS, "input"), (SpanAttribute.OUTPUT_TOKENS, "output")):
            tokens = _number(source.get(key))
            if tokens is not None:
                usage[name] = int(tokens)
                attributes[key] = int(tokens)
        if usage:
            usage["total"] = sum(usage.values())
            attributes[LangfuseAttribute.USAGE_DETAILS] = json.dumps(usage, separators=(",", ":"))
        cost = next((c for key in COST_ATTRIBUTE_ALIASES if (c := _number(source.get(key))) is not None), None)
        if cost is not None:
            attributes[SpanAttribute.COST_USD] = cost
            attributes[LangfuseAttribute.COST_DETAILS] = json.dumps({"total": cost}, separators=(",", ":"))

    status_message = redactor.text(span.status_message) if span.status_message else None
    if span.status == "error":
        attributes[LangfuseAttribute.LEVEL] = "ERROR"
        if status_message:
            attributes[LangfuseAttribute.STATUS_MESSAGE] = status_message

    for attribute_name, value in source.items():
        if attribute_name in _MAPPED or attribute_name in attributes:
            continue
        converted = _attribute(value, redactor)
        if converted is not None:
            attributes[attribute_name] = converted

    return ExportSpan(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        name=span.name,
        kind=span.kind,
        service=span.service,
        start=span.start,
        end=span.end,
        status=span.status,
        status_message=status_message,
        attributes=attributes,
    )
