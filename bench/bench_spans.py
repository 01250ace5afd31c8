"""Spans: what emitting one costs a handler, and how fast the trace-exporter exports them. Figures, not a test.

It starts a nats-server from the wheel on free ports with a temporary store, applies the registry's
topology, and measures, in the same run:

1. emit cost: a small handler (decode a JSON message, build a reply) called N times, alone and then
   wrapped in `SpanEmitter.span(...)` with two attributes. "hot path" is the time `span()`/`record()` add
   per call while the publisher task is not running (what a handler waits for); "amortised" also counts the
   background validation, serialisation and JetStream publish of every span, with the publisher running
   on the same event loop (the handler loop yields every 100 calls). Trials alternate; medians are shown.
2. emitter publish rate: spans/s from `record()` until the stream acknowledged them all, against a raw
   floor: the same number of pre-encoded payloads published with nats-py `publish_async`.
3. export rate: spans/s through the trace-exporter (ConsumerRunner, batching, ledger, sink) until every
   span message is acked, into the JSONL file and into a local OTLP/HTTP receiver, against a raw floor:
   plain nats-py fetch + ack of the same messages on a bench-only durable consumer (no decode, no export).

    uv run python bench/bench_spans.py [--spans 20000] [--calls 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats.errors
from agentbus.contracts.registry import SPAN, SPANS, TRACE_EXPORTER_SPANS
from agentbus.runtime.bootstrap import apply_topology, consumer_config
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess, free_port
from agentbus.runtime.spans import SpanAttribute, SpanEmitter
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.app import create_app
from agentbus.trace_exporter.settings import TraceExporterSettings
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

FLOOR_DURABLE = "benchfloor-spans"
PAYLOAD = json.dumps({"task_id": "task-1", "tenant": "acme", "step": 3, "input": "What is calculator(19*23)?"}).encode()


def handler_work(payload: bytes) -> dict[str, Any]:
    """The handler body both variants share: decode a message and build a reply."""
    message = json.loads(payload)
    return {"task_id": message["task_id"], "step": message["step"] + 1, "words": len(message["input"].split())}


async def plain_handler(payload: bytes, emitter: SpanEmitter, trace: TraceContext) -> None:
    handler_work(payload)


async def span_handler(payload: bytes, emitter: SpanEmitter, trace: TraceContext) -> None:
    ctx = trace.child()
    with emitter.span("step", "agent_step", ctx, parent_span_id=trace.span_id, task_id="task-1", tenant="acme") as s:
        reply = handler_work(payload)
        s.set(SpanAttribute.AGENT, "assistant")
        s.set("step", reply["step"])


Handler = Callable[[bytes, SpanEmitter, TraceContext], Awaitable[None]]


async def time_calls(handler: Handler, emitter: SpanEmitter, calls: int, yield_every: int) -> float:
    """Seconds per call; with `yield_every`, the loop yields so the span publisher can run, and the clock
    stops only once every span recorded is published."""
    trace = TraceContext.new()
    started = time.perf_counter()
    for i in range(calls):
        await handler(PAYLOAD, emitter, trace)
        if yield_every and i % yield_every == 0:
            await asyncio.sleep(0)
    while yield_every and emitter.buffered:
        await asyncio.sleep(0.001)
    return (time.perf_counter() - started) / calls


async def emit_cost(js: JetStreamContext, calls: int, repeat: int) -> dict[str, float]:
    trials: dict[str, list[float]] = {"plain": [], "hot": [], "plain_yielding": [], "amortised": []}
    dropped = 0
    for _ in range(repeat):
        idle = SpanEmitter("bench-idle", capacity=calls + 1)  # never started: record() only buffers
        trials["plain"].append(await time_calls(plain_handler, idle, calls, 0))
        trials["hot"].append(await time_calls(span_handler, idle, calls, 0))
        running = SpanEmitter("bench-running", capacity=calls + 1)
        await running.start(js)
        trials["plain_yielding"].append(await time_calls(plain_handler, running, calls, 100))
        trials["amortised"].append(await time_calls(span_handler, running, calls, 100))
        await running.stop(timeout=60)
        dropped += running.dropped
    medians = {name: statistics.median(values) * 1e6 for name, values in trials.items()}
    medians["dropped"] = dropped
    return medians


async def publish_rate(js: JetStreamContext, count: int) -> float:
    emitter = SpanEmitter("bench-publish", capacity=count + 1)
    trace = TraceContext.new()
    now = datetime.now(UTC)
    started = time.perf_counter()
    await emitter.start(js)
    for i in range(count):
        emitter.record(
            name=f"step {i}",
            kind="generation",
            trace=trace.child(),
            parent_span_id=trace.span_id,
            start=now,
            end=now,
            task_id=f"task-{i % 100}",
            tenant="acme",
            attributes={
                SpanAttribute.MODEL: "scripted",
                SpanAttribute.INPUT_TOKENS: 120,
                SpanAttribute.INPUT: "x" * 200,
            },
        )
    await emitter.stop(timeout=300)
    elapsed = time.perf_counter() - started
    if emitter.published != count:
        raise RuntimeError(f"published {emitter.published} of {count} spans")
    return count / elapsed


async def raw_publish_rate(js: JetStreamContext, count: int) -> float:
    """The floor of the emitter: the same number of already-encoded span payloads, published with
    `publish_async` in batches of 256 and all acks awaited (no buffer, no validation, no serialisation)."""
    trace = TraceContext.new()
    now = datetime.now(UTC).isoformat()
    payloads = [
        json.dumps(
            {
                "schema_version": 1,
                "trace_id": trace.trace_id,
                "span_id": trace.child().span_id,
                "name": f"step {i}",
                "kind": "generation",
                "service": "bench-floor",
                "start": now,
                "end": now,
                "attributes": {"gen_ai.request.model": "scripted", "langfuse.observation.input": "x" * 200},
            }
        ).encode()
        for i in range(count)
    ]
    subject = SPAN.format(service="bench-floor")
    started = time.perf_counter()
    for i in range(0, count, 256):
        futures = [
            await js.publish_async(subject, p, headers={"Nats-Msg-Id": f"floor:{i}:{j}"})
            for j, p in enumerate(payloads[i : i + 256])
        ]
        await asyncio.gather(*futures)
    return count / (time.perf_counter() - started)


async def consumer_drained(js: JetStreamContext, durable: str) -> None:
    while True:
        info = await js.consumer_info(SPANS.name, durable)
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.02)


async def floor_rate(js: JetStreamContext, count: int, batch: int) -> float:
    """Raw nats-py: fetch and ack every span message, nothing else. Spans per second (`count` spans, carried
    by as many messages as the emitter made of them: one each, or a batch of several)."""
    messages = (await js.stream_info(SPANS.name)).state.messages
    await js.add_consumer(
        SPANS.name,
        ConsumerConfig(
            name=FLOOR_DURABLE,
            durable_name=FLOOR_DURABLE,
            filter_subject=SPAN.wildcard,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=10_000,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=FLOOR_DURABLE, stream=SPANS.name)
    started = time.perf_counter()
    seen = 0
    while seen < messages:
        try:
            msgs = await sub.fetch(batch, timeout=2.0)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()
        seen += len(msgs)
    await consumer_drained(js, FLOOR_DURABLE)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await js.delete_consumer(SPANS.name, FLOOR_DURABLE)
    return count / elapsed


class CountingReceiver:
    """An OTLP/HTTP endpoint that accepts every request (the body is read, not decoded)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/public/otel"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def exporter_rate(nc: NatsClient, count: int, settings: TraceExporterSettings) -> float:
    js = nc.jetstream()
    # Start the exporter's durable consumer from the first span, as after a long backend outage.
    await js.delete_consumer(SPANS.name, TRACE_EXPORTER_SPANS.durable)
    await js.add_consumer(SPANS.name, consumer_config(TRACE_EXPORTER_SPANS))
    app = create_app(settings)
    started = time.perf_counter()
    await app.start()
    try:
        await consumer_drained(js, TRACE_EXPORTER_SPANS.durable)
        elapsed = time.perf_counter() - started
    finally:
        await app.stop()
    sink = "otlp" if settings.otlp_endpoint else "jsonl"
    exported = app.registry.get_sample_value("agentbus_trace_spans_exported_total", {"sink": sink})
    if exported != count:
        raise RuntimeError(f"exported {exported} of {count} spans")
    return count / elapsed


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-spans-") as tmp:
        root = Path(tmp)
        (root / "js").mkdir()
        server = NatsServerProcess(
            store_dir=root / "js", port=free_port(), monitor_port=free_port(), log_file=root / "nats.log"
        )
        server.start()
        try:
            nc = await connect_nats(server.url, "bench-spans")
            js = nc.jetstream()
            await apply_topology(js)
            print("measuring emit cost ...", file=sys.stderr)
            cost = await emit_cost(js, args.calls, args.repeat)
            await js.purge_stream(SPANS.name)
            print("publishing spans ...", file=sys.stderr)
            raw_publish = await raw_publish_rate(js, args.spans)
            await js.purge_stream(SPANS.name)
            publish_rates = [await publish_rate(js, args.spans)]
            messages = (await js.stream_info(SPANS.name)).state.messages
            floor_rates, jsonl_rates, otlp_rates = [], [], []
            receiver = CountingReceiver()
            try:
                for trial in range(args.repeat_export):
                    print(f"export trial {trial + 1} ...", file=sys.stderr)
                    floor_rates.append(await floor_rate(js, args.spans, args.batch))
                    common: dict[str, Any] = {"nats_url": server.url, "log_level": "WARNING"}
                    jsonl_rates.append(
                        await exporter_rate(
                            nc,
                            args.spans,
                            TraceExporterSettings(
                                **common,
                                jsonl_path=root / f"traces-{trial}.jsonl",
                                ledger_path=root / f"ledger-jsonl-{trial}.sqlite3",
                            ),
                        )
                    )
                    otlp_rates.append(
                        await exporter_rate(
                            nc,
                            args.spans,
                            TraceExporterSettings(
                                **common,
                                otlp_endpoint=receiver.endpoint,
                                ledger_path=root / f"ledger-otlp-{trial}.sqlite3",
                            ),
                        )
                    )
            finally:
                receiver.close()
            await nc.close()
        finally:
            server.stop()

    floor = statistics.median(floor_rates)
    print(f"\nspans bench, {datetime.now(UTC):%Y-%m-%d}, Python {platform.python_version()}, {platform.machine()}")
    print(f"\nemit cost per handler call (median of {args.repeat} trials of {args.calls} calls)")
    print(f"  handler alone                          {cost['plain']:8.2f} us")
    print(f"  handler + span, hot path               {cost['hot']:8.2f} us   (+{cost['hot'] - cost['plain']:.2f} us)")
    print(f"  handler alone, loop yielding           {cost['plain_yielding']:8.2f} us")
    print(
        f"  handler + span, amortised publishing   {cost['amortised']:8.2f} us   "
        f"(+{cost['amortised'] - cost['plain_yielding']:.2f} us)"
    )
    print(f"  spans dropped                          {int(cost['dropped']):8d}")
    print(f"\nrates ({args.spans} spans; export: median of {args.repeat_export} trials)")
    published = statistics.median(publish_rates)
    print(f"  floor: raw publish_async + acks         {raw_publish:8.0f} spans/s")
    print(
        f"  emitter publish (record -> stream ack)  {published:8.0f} spans/s   ({published / raw_publish:.2f}x floor)"
    )
    print(f"  the emitter sent the {args.spans} spans in {messages} messages")
    print(f"  floor: raw fetch + ack                  {floor:8.0f} spans/s")
    jsonl, otlp = statistics.median(jsonl_rates), statistics.median(otlp_rates)
    print(f"  trace-exporter -> JSONL                 {jsonl:8.0f} spans/s   ({jsonl / floor:.2f}x floor)")
    print(f"  trace-exporter -> OTLP/HTTP receiver    {otlp:8.0f} spans/s   ({otlp / floor:.2f}x floor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000, help="spans published and exported per trial")
    parser.add_argument("--calls", type=int, default=50_000, help="handler calls per emit-cost trial")
    parser.add_argument("--repeat", type=int, default=5, help="emit-cost trials")
    parser.add_argument("--repeat-export", type=int, default=3, help="export trials")
    parser.add_argument("--batch", type=int, default=64, help="fetch batch of the floor")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
