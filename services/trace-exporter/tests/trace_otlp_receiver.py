"""A local OTLP/HTTP receiver for tests: decodes each ExportTraceServiceRequest and can play a backend outage."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

OTLP_BASE_PATH = "/api/public/otel"


def plain(value: AnyValue) -> Any:
    """An OTLP attribute value as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span the receiver accepted, decoded."""

    service: str
    scope: str
    span: Span

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def parent_span_id(self) -> str | None:
        return self.span.parent_span_id.hex() or None

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: plain(kv.value) for kv in self.span.attributes}


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    status: int
    span_names: list[str]
    wire_bytes: int
    """The body's size as it came over the wire (compressed, when it was)."""
    body_bytes: int
    """The size of the protobuf request it carried."""

    def header(self, name: str) -> str | None:
        """A request header, by its case-insensitive name."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


class OtlpReceiver:
    """ThreadingHTTPServer on a free port. `down` makes it answer 503; `reject_names` makes it answer 400;
    `delay_seconds` makes it take that long over each request.

    A body sent with `Content-Encoding: gzip` is decompressed first, as an OTLP/HTTP receiver does; any other
    encoding is answered 415.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down = False
        self.delay_seconds = 0.0
        self.reject_names: set[str] = set()
        self.requests: list[ReceivedRequest] = []
        self.spans: list[ReceivedSpan] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                wire = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "identity").lower()
                if encoding not in {"identity", "gzip"}:
                    self.send_response(415)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = gzip.decompress(wire) if encoding == "gzip" else wire
                if receiver.delay_seconds:
                    time.sleep(receiver.delay_seconds)  # a slow backend; each request has its own thread
                request = ExportTraceServiceRequest.FromString(body)
                status = receiver._accept(self.path, dict(self.headers), request, len(wire), len(body))
                payload = ExportTraceServiceResponse().SerializeToString() if status == 200 else b"unavailable"
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _accept(
        self, path: str, headers: dict[str, str], request: ExportTraceServiceRequest, wire_bytes: int, body_bytes: int
    ) -> int:
        decoded = [
            ReceivedSpan(
                service=next(plain(a.value) for a in rs.resource.attributes if a.key == "service.name"),
                scope=ss.scope.name,
                span=span,
            )
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        names = [s.span.name for s in decoded]
        with self._lock:
            if self.down:
                status = 503
            elif self.reject_names.intersection(names):
                status = 400
            else:
                status = 200
                self.spans.extend(decoded)
            self.requests.append(ReceivedRequest(path, headers, status, names, wire_bytes, body_bytes))
        return status

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{OTLP_BASE_PATH}"

    def accepted(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def statuses(self) -> list[int]:
        with self._lock:
            return [r.status for r in self.requests]

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def spans_by_id(spans: Iterator[ReceivedSpan] | list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """The spans keyed by span id; fails if any id came twice."""
    by_id: dict[str, ReceivedSpan] = {}
    for span in spans:
        assert span.span_id not in by_id, f"span {span.span_id} ({span.span.name}) exported twice"
        by_id[span.span_id] = span
    return by_id
