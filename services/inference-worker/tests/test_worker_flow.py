"""The worker on a real nats-server: results, usage, token streaming, resume after redelivery, in-progress acks,
aborts, readiness, bad input, and draining on SIGTERM in a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest_asyncio
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.llm import ChatMessage, LlmAbort, LlmRequest, LlmResult
from agentbus.contracts.registry import (
    DEAD_LETTER,
    DEAD_LETTERS,
    LLM_ABORT,
    LLM_REQUEST,
    LLM_RESULT,
    LLM_RESULTS,
    TASK_EVENT,
    USAGE,
    USAGE_RECORDED,
    ConsumerSpec,
    Header,
    budget_subject,
    inference_consumer,
)
from agentbus.contracts.tasks import TaskToken
from agentbus.contracts.usage import UsageRecorded
from agentbus.inference_worker.app import WorkerApp, create_app
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.ports import Generation, TextSink
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.inference_worker.streaming import token_msg_id
from agentbus.runtime.bootstrap import consumer_config
from agentbus.runtime.publishing import publish_message
from agentbus.runtime.server import NatsServerProcess, free_port
from agentbus.runtime.spans import NullSpanEmitter
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy


def _ids() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    return f"m-{suffix}", f"tenant-{suffix}"


def _request(model: str, tenant: str, content: str = "please say something long", **fields: Any) -> LlmRequest:
    task_id = f"task-{uuid.uuid4().hex[:8]}"
    return LlmRequest(
        request_id=f"{task_id}.step-1",
        task_id=task_id,
        tenant=tenant,
        agent="assistant",
        model=model,
        step=1,
        messages=[ChatMessage(role="user", content=content)],
        **fields,
    )


async def _consumer(js: JetStreamContext, model: str, **overrides: Any) -> ConsumerSpec:
    spec = replace(inference_consumer(model), **overrides)
    await js.add_consumer(spec.stream, consumer_config(spec))
    return spec


async def _publish(js: JetStreamContext, request: LlmRequest) -> None:
    await publish_message(js, LLM_REQUEST.format(model=request.model), request, msg_id=f"llm:{request.request_id}")


async def _results(js: JetStreamContext, tenant: str, count: int = 1, timeout: float = 30) -> list[LlmResult]:
    """Results on the tenant's subject (read by sequence: no consumer competes with the runner's)."""
    subject = LLM_RESULT.format(tenant=tenant)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.stream_info(LLM_RESULTS.name, subjects_filter=subject)
        if (info.state.subjects or {}).get(subject, 0) >= count:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"fewer than {count} results on {subject}")
        await asyncio.sleep(0.05)
    results: list[LlmResult] = []
    seq = 0
    while len(results) < count:
        msg = await js.get_msg(LLM_RESULTS.name, seq=seq + 1, subject=subject, next=True)
        assert msg.data is not None
        assert msg.seq is not None
        results.append(LlmResult.model_validate_json(msg.data))
        seq = msg.seq
    return results


async def _subject_count(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _token_events(js: JetStreamContext, tenant: str, task_id: str) -> list[tuple[TaskToken, str]]:
    subject = TASK_EVENT.format(tenant=tenant, task_id=task_id)
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    events = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            events.append((TaskToken.model_validate_json(msg.data), (msg.headers or {})[Header.MSG_ID.value]))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return events


def _settings(nats_url: str, model: str, **fields: Any) -> WorkerSettings:
    return WorkerSettings(nats_url=nats_url, models=[model], drain_timeout_seconds=2, **fields)


@pytest_asyncio.fixture
async def js(bootstrapped_nats: NatsServerProcess, nats_client: NatsClient) -> AsyncIterator[JetStreamContext]:
    yield nats_client.jetstream()


async def _run(app: WorkerApp) -> WorkerApp:
    await app.start()
    return app


async def test_streams_tokens_then_publishes_result_and_usage(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext
) -> None:
    model, tenant = _ids()
    spec = await _consumer(js, model)
    request = _request(model, tenant, stream=True, event_seq=3)
    await _publish(js, request)  # waits in the stream before the worker starts: a measurable queue wait
    settings = _settings(bootstrapped_nats.url, model, token_flush_chars=16, node_class="nvidia-l4")
    engine = ScriptedEngine(token_delay_seconds=0.002)
    app = await _run(create_app(settings, engine, consumer_for=lambda _: spec, spans=NullSpanEmitter()))
    try:
        [result] = await _results(js, tenant)
    finally:
        await app.stop()
    assert result.error is None
    assert result.message is not None
    assert result.message.content.startswith("[scripted offline engine, not an LLM]")
    assert result.queue_ms > 0
    assert result.ttft_ms is not None
    assert result.node_class == "nvidia-l4"
    assert result.gpu_seconds > 0

    tokens = await _token_events(js, tenant, request.task_id)
    assert len(tokens) > 1
    assert [event.chunk for event, _ in tokens] == list(range(1, len(tokens) + 1))
    assert {(event.seq, event.step) for event, _ in tokens} == {(3, 1)}
    assert "".join(event.text for event, _ in tokens) == result.message.content
    assert [msg_id for _, msg_id in tokens] == [token_msg_id(request.request_id, e.chunk) for e, _ in tokens]

    stored = await js.get_last_msg(USAGE.name, budget_subject(USAGE_RECORDED, tenant))
    assert stored.data is not None
    usage = UsageRecorded.model_validate_json(stored.data)
    assert usage.usage_id == f"llm:{request.request_id}" == usage.reservation_id
    assert usage.completion_tokens == result.usage.completion_tokens > 0
    assert usage.gpu_seconds == result.gpu_seconds
    assert usage.node_class == "nvidia-l4"


async def test_a_redelivered_stream_continues_where_the_first_attempt_stopped(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext
) -> None:
    model, tenant = _ids()
    spec = await _consumer(js, model)
    request = _request(model, tenant, stream=True, event_seq=1)
    expected = (await ScriptedEngine().generate(request)).message.content
    # The first attempt streamed two chunks, then its worker died; its message comes back (deliveries = 2).
    subject = TASK_EVENT.format(tenant=tenant, task_id=request.task_id)
    for chunk, text in ((1, expected[:10]), (2, expected[10:17])):
        token = TaskToken(task_id=request.task_id, tenant=tenant, seq=1, step=1, chunk=chunk, text=text)
        await publish_message(js, subject, token, msg_id=token_msg_id(request.request_id, chunk))
    await _publish(js, request)
    first_attempt = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    [msg] = await first_attempt.fetch(1, timeout=5)
    await first_attempt.unsubscribe()
    await msg.nak()

    settings = _settings(bootstrapped_nats.url, model, token_flush_chars=8)
    app = await _run(create_app(settings, ScriptedEngine(), consumer_for=lambda _: spec, spans=NullSpanEmitter()))
    try:
        [result] = await _results(js, tenant)
    finally:
        await app.stop()
    assert result.message is not None
    assert result.message.content == expected
    tokens = await _token_events(js, tenant, request.task_id)
    assert [event.chunk for event, _ in tokens] == list(range(1, len(tokens) + 1))
    assert len(tokens) > 2
    assert "".join(event.text for event, _ in tokens) == expected


class CountingSlowEngine:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.started = asyncio.Event()
        self.healthy_now = True

    def healthy(self) -> bool:
        return self.healthy_now

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        self.calls += 1
        self.started.set()
        await asyncio.sleep(self.seconds)
        return await ScriptedEngine().generate(request, on_text)


async def test_in_progress_acks_keep_a_long_generation_from_being_redelivered(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext
) -> None:
    model, tenant = _ids()
    spec = await _consumer(js, model, ack_wait_seconds=1.0)
    engine = CountingSlowEngine(seconds=3.5)
    app = await _run(
        create_app(
            _settings(bootstrapped_nats.url, model), engine, consumer_for=lambda _: spec, spans=NullSpanEmitter()
        )
    )
    try:
        await _publish(js, _request(model, tenant))
        [result] = await _results(js, tenant)
        await asyncio.sleep(1.5)  # a redelivery during the generation would be generating now
    finally:
        await app.stop()
    assert result.error is None
    assert engine.calls == 1
    assert await _subject_count(js, LLM_RESULTS.name, LLM_RESULT.format(tenant=tenant)) == 1


async def test_an_abort_notice_stops_the_generation_with_an_aborted_result(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext, nats_client: NatsClient
) -> None:
    model, tenant = _ids()
    spec = await _consumer(js, model)
    engine = CountingSlowEngine(seconds=60)
    app = await _run(
        create_app(
            _settings(bootstrapped_nats.url, model), engine, consumer_for=lambda _: spec, spans=NullSpanEmitter()
        )
    )
    try:
        request = _request(model, tenant)
        await _publish(js, request)
        await asyncio.wait_for(engine.started.wait(), timeout=10)
        abort = LlmAbort(request_id=request.request_id, task_id=request.task_id)
        await nats_client.publish(LLM_ABORT.format(model=model), abort.model_dump_json().encode())
        [result] = await _results(js, tenant, timeout=10)
    finally:
        await app.stop()
    assert result.finish_reason == "error"
    assert result.error is not None
    assert result.error.code == "aborted"


async def test_readiness_follows_engine_health_and_bad_requests_are_dead_lettered(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext
) -> None:
    model, _ = _ids()
    spec = await _consumer(js, model)
    engine = CountingSlowEngine(seconds=0)
    app = await _run(
        create_app(
            _settings(bootstrapped_nats.url, model), engine, consumer_for=lambda _: spec, spans=NullSpanEmitter()
        )
    )
    try:
        assert app.ready()
        engine.healthy_now = False
        assert not app.ready()
        engine.healthy_now = True
        await js.publish(LLM_REQUEST.format(model=model), b'{"request_id": "x"}')
        subject = DEAD_LETTER.format(stream=spec.stream, consumer=spec.durable)
        for _ in range(200):
            if await _subject_count(js, DEAD_LETTERS.name, subject):
                break
            await asyncio.sleep(0.05)
        stored = await js.get_last_msg(DEAD_LETTERS.name, subject)
    finally:
        await app.stop()
    assert stored.data is not None
    letter = DeadLetter.model_validate_json(stored.data)
    assert letter.error.code == "schema_violation"
    assert engine.calls == 0


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(values) if values else None


async def test_sigterm_hands_in_flight_requests_back_and_exits(
    bootstrapped_nats: NatsServerProcess, js: JetStreamContext
) -> None:
    model, tenant = _ids()
    spec = await _consumer(js, model)  # the registry's ack_wait (60 s): only a nak brings a request back sooner
    requests = [_request(model, tenant) for _ in range(6)]
    for request in requests:
        await _publish(js, request)
    port = free_port()
    env = {
        **os.environ,
        "AGENTBUS_WORKER_NATS_URL": bootstrapped_nats.url,
        "AGENTBUS_WORKER_MODELS": f'["{model}"]',
        "AGENTBUS_WORKER_MAX_CONCURRENCY": "4",
        "AGENTBUS_WORKER_SCRIPTED_TOKEN_DELAY_SECONDS": "5",
        "AGENTBUS_WORKER_DRAIN_TIMEOUT_SECONDS": "1",
        "AGENTBUS_WORKER_HTTP_PORT": str(port),
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentbus.inference_worker",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(600):
            if await asyncio.to_thread(_metric, port, "agentbus_llm_in_flight") == 4:
                break
            assert worker.returncode is None
            await asyncio.sleep(0.05)
        # max_concurrency in flight, two still queued
        assert await asyncio.to_thread(_metric, port, "agentbus_llm_in_flight") == 4
        worker.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(worker.communicate(), timeout=30)
        exit_code = worker.returncode
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert exit_code == 0, stderr.decode()
    assert await _subject_count(js, LLM_RESULTS.name, LLM_RESULT.format(tenant=tenant)) == 0

    # Another worker gets all six well within the 60 s ack_wait: the four in flight were handed back (nak),
    # not left to time out. (A nak'd message counts as ack-pending until it is redelivered.)
    app = await _run(
        create_app(
            _settings(bootstrapped_nats.url, model),
            ScriptedEngine(),
            consumer_for=lambda _: spec,
            spans=NullSpanEmitter(),
        )
    )
    try:
        results = await _results(js, tenant, count=6, timeout=20)
    finally:
        await app.stop()
    assert {r.request_id for r in results} == {r.request_id for r in requests}
    assert all(r.error is None for r in results)
