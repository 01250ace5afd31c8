"""A TraceSink that sends spans to Langfuse (or any OTLP/HTTP receiver) as protobuf ExportTraceServiceRequests."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
from agentbus.trace_exporter.domain import AttributeValue, ExportSpan
from agentbus.trace_exporter.ports import BackendUnavailable, SpansRejected
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

TRACES_PATH = "/v1/traces"
SCOPE_NAME = "agentbus"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
LANGFUSE_INGESTION_VERSION_HEADER = "x-langfuse-ingestion-version"
LANGFUSE_INGESTION_VERSION = "4"
"""Langfuse routes OTLP data without this header (as its own SDK sends it) onto a delayed path (up to ~10 min)."""
GZIP_LEVEL = 6
_GZIP_OFF_LOOP_BYTES = 256 * 1024  # larger bodies are compressed on a worker thread, off the event loop
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Statuses after which the same request may succeed later. 401/403 are here too: wrong keys are fixed by
# an operator, and until then the spans are better waiting in JetStream than dead-lettered.
_RETRYABLE_STATUSES = frozenset({401, 403, 404, 408, 425, 429, 500, 502, 503, 504})


def traces_url(endpoint: str) -> str:
    """`<endpoint>/v1/traces`, unless the endpoint already names it."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def basic_auth(public_key: str, secret_key: str) -> str:
    """Langfuse's OTLP authentication: HTTP basic with the public key as user and the secret key as password."""
    return "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")


def unix_nanos(moment: datetime) -> int:
    """Nanoseconds since the epoch, exactly (a float would lose the microseconds)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _any_value(value: AttributeValue) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=str(v)) for v in value]))
    return AnyValue(string_value=value)


def _otlp_span(span: ExportSpan) -> Span:
    return Span(
        trace_id=bytes.fromhex(span.trace_id),
        span_id=bytes.fromhex(span.span_id),
        parent_span_id=bytes.fromhex(span.parent_span_id) if span.parent_span_id else b"",
        name=span.name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=unix_nanos(span.start),
        end_time_unix_nano=unix_nanos(span.end),
        attributes=[KeyValue(key=str(key), value=_any_value(value)) for key, value in span.attributes.items()],
        status=Status(
            code=Status.STATUS_CODE_ERROR if span.status == "error" else Status.STATUS_CODE_OK,
            message=span.status_message or "",
        ),
    )


def encode_request(spans: Sequence[ExportSpan]) -> ExportTraceServiceRequest:
    """One ResourceSpans per emitting service (`service.name`), all under the `agentbus` scope."""
    by_service: dict[str, list[Span]] = {}
    for span in spans:
        by_service.setdefault(span.service, []).append(_otlp_span(span))
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))]),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name=SCOPE_NAME), spans=otlp_spans)],
            )
            for service, otlp_spans in by_service.items()
        ]
    )


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(float(response.headers["retry-after"]), 0.0)
    except (KeyError, ValueError):
        return None


async def gzipped(body: bytes) -> bytes:
    """The body gzip-compressed (large ones on a worker thread)."""
    if len(body) >= _GZIP_OFF_LOOP_BYTES:
        return await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
    return gzip.compress(body, GZIP_LEVEL)


class OtlpHttpTraceSink:
    """POSTs protobuf ExportTraceServiceRequests to `<endpoint>/v1/traces`, e.g. Langfuse's /api/public/otel.

    Every request carries Langfuse's ingestion version header and, unless `compress` is off, a gzip body
    (`Content-Encoding: gzip`, which OTLP/HTTP receivers and Langfuse accept): span attributes are
    repetitive text, and compressed batches are several times smaller on the wire.
    """

    name = "otlp"

    def __init__(
        self,
        endpoint: str,
        *,
        authorization: str | None = None,
        timeout_seconds: float = 10.0,
        compress: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = traces_url(endpoint)
        self.compress = compress
        headers = {
            "Content-Type": PROTOBUF_CONTENT_TYPE,
            LANGFUSE_INGESTION_VERSION_HEADER: LANGFUSE_INGESTION_VERSION,
        }
        if compress:
            headers["Content-Encoding"] = "gzip"
        if authorization is not None:
            headers["Authorization"] = authorization
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout_seconds, transport=transport)

    async def export(self, spans: Sequence[ExportSpan]) -> None:
        body = encode_request(spans).SerializeToString()
        if self.compress:
            body = await gzipped(body)
        try:
            response = await self._client.post(self.url, content=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"POST {self.url} failed: {exc!r}") from exc
        if response.is_success:
            return
        detail = f"POST {self.url} answered {response.status_code}: {response.text[:500]}"
        if response.status_code in _RETRYABLE_STATUSES or response.status_code >= 500:
            raise BackendUnavailable(detail, retry_after_seconds=_retry_after(response))
        raise SpansRejected(detail)

    async def close(self) -> None:
        await self._client.aclose()
