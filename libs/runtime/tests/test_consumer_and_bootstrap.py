"""The consumer runtime and the bootstrap against a real nats-server."""

from __future__ import annotations

import asyncio
import base64
import random
import urllib.error
import urllib.request
import uuid
from dataclasses import replace

import nats.js.errors
import pytest
from agentbus.contracts import registry
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.registry import DEAD_LETTERS, ConsumerSpec
from agentbus.runtime.bootstrap import apply_topology, consumer_config
from agentbus.runtime.consumer import (
    DUPLICATE_IN_PROCESS_ERR_CODE,
    RETRIES_EXHAUSTED_CODE,
    AckPolicy,
    ConsumerRunner,
    Delivery,
    dependency_retry_delay,
)
from agentbus.runtime.errors import DependencyUnavailableError, RetryableError, TerminalError
from agentbus.runtime.http import HealthServer
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.server import NatsServerProcess
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig
from prometheus_client import CollectorRegistry


async def _consumer_on_fresh_stream(nc: NatsClient, max_deliver: int = 3) -> ConsumerSpec:
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.*"], retention="workqueue"))  # type: ignore[arg-type]
    spec = ConsumerSpec(
        durable=f"{name}-worker",
        stream=name,
        filter_subject=f"{name}.*",
        service="test",
        description="test consumer",
        ack_wait_seconds=5,
        max_deliver=max_deliver,
        retry_delay_seconds=0.05,
    )
    await js.add_consumer(name, consumer_config(spec))
    return spec


async def _dead_letters_for(nc: NatsClient, spec: ConsumerSpec, count: int) -> list[DeadLetter]:
    js = nc.jetstream()
    sub = await js.subscribe(f"agentbus.deadletter.{spec.stream}.{spec.durable}", ordered_consumer=True)
    letters = [DeadLetter.model_validate_json((await sub.next_msg(timeout=10)).data) for _ in range(count)]
    await sub.unsubscribe()
    return letters


async def _run_until(runner: ConsumerRunner, done: asyncio.Event) -> None:
    await runner.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=15)
    finally:
        await runner.stop(drain_timeout=2)


async def test_a_failing_message_is_retried_then_dead_lettered_with_its_error_and_origin(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = await _consumer_on_fresh_stream(nats_client, max_deliver=3)
    deliveries: list[int] = []
    done = asyncio.Event()

    async def flaky(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        if len(deliveries) == 3:
            done.set()
        raise RetryableError("database briefly unavailable")

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(nats_client.jetstream(), spec, flaky, ack_policy=AckPolicy.ACK, metrics=metrics)
    await nats_client.jetstream().publish(f"{spec.stream}.x", b'{"n": 1}', headers={"k": "v"})
    await _run_until(runner, done)

    assert deliveries == [1, 2, 3]
    [letter] = await _dead_letters_for(nats_client, spec, 1)
    assert letter.error.code == RETRIES_EXHAUSTED_CODE
    assert "database briefly unavailable" in letter.error.message
    assert (letter.stream, letter.consumer, letter.subject, letter.deliveries) == (
        spec.stream,
        spec.durable,
        f"{spec.stream}.x",
        3,
    )
    assert base64.b64decode(letter.payload_base64) == b'{"n": 1}'
    assert letter.headers["k"] == "v"
    info = await nats_client.jetstream().stream_info(spec.stream)
    assert info.state.messages == 0, "the work-queue message was acked once dead-lettered"


async def test_a_terminal_error_is_dead_lettered_at_once_and_the_consumer_keeps_serving(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = await _consumer_on_fresh_stream(nats_client, max_deliver=5)
    handled: list[bytes] = []
    done = asyncio.Event()

    async def strict(delivery: Delivery) -> None:
        if delivery.data == b"poison":
            raise TerminalError("schema_violation", "not a valid message")
        handled.append(delivery.data)
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(nats_client.jetstream(), spec, strict, ack_policy=AckPolicy.ACK_SYNC, metrics=metrics)
    js = nats_client.jetstream()
    await js.publish(f"{spec.stream}.x", b"poison")
    await js.publish(f"{spec.stream}.x", b"good")
    await _run_until(runner, done)

    [letter] = await _dead_letters_for(nats_client, spec, 1)
    assert (letter.error.code, letter.deliveries, letter.payload) == ("schema_violation", 1, "poison")
    assert handled == [b"good"]


async def test_unexpected_exceptions_are_retried_not_terminated(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = await _consumer_on_fresh_stream(nats_client, max_deliver=5)
    attempts: list[int] = []
    done = asyncio.Event()

    async def buggy_once(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        if delivery.deliveries == 1:
            raise KeyError("a bug that a redelivery survives")
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(nats_client.jetstream(), spec, buggy_once, ack_policy=AckPolicy.ACK, metrics=metrics)
    await nats_client.jetstream().publish(f"{spec.stream}.x", b"m")
    await _run_until(runner, done)
    assert attempts == [1, 2]


async def test_a_dependency_outage_is_waited_for_past_max_deliver_and_never_dead_lettered(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = replace(
        await _consumer_on_fresh_stream(nats_client, max_deliver=2),
        dependency_retry_first_seconds=0.02,
        dependency_retry_max_seconds=0.05,
    )
    attempts: list[int] = []
    done = asyncio.Event()

    async def waiting_for_the_accountant(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        if len(attempts) < 6:
            raise DependencyUnavailableError("the cost-accountant did not answer")
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(
        nats_client.jetstream(), spec, waiting_for_the_accountant, ack_policy=AckPolicy.ACK, metrics=metrics
    )
    await nats_client.jetstream().publish(f"{spec.stream}.x", b"m")
    await _run_until(runner, done)
    assert attempts == [1, 2, 3, 4, 5, 6], "delivered past max_deliver while the dependency was away"
    letters = await nats_client.jetstream().stream_info(
        DEAD_LETTERS.name, subjects_filter=f"agentbus.deadletter.{spec.stream}.>"
    )
    assert letters.state.subjects in (None, {}), "nothing was dead-lettered"


async def test_a_publish_no_stream_answers_is_waited_for_like_an_outage_never_dead_lettered(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    """In a cluster, a replicated stream between two leaders answers no publish (nats-py raises
    NoStreamResponseError): the handler's message must wait for the election, not count towards max_deliver."""
    spec = replace(
        await _consumer_on_fresh_stream(nats_client, max_deliver=2),
        dependency_retry_first_seconds=0.02,
        dependency_retry_max_seconds=0.05,
    )
    js = nats_client.jetstream()
    leaderless = f"leaderless-{uuid.uuid4().hex[:8]}"
    attempts: list[int] = []
    done = asyncio.Event()

    async def publishing_an_event(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        if len(attempts) == 5:
            # The stream is back (a new leader): the next publish is answered.
            await js.add_stream(StreamConfig(name=leaderless, subjects=[f"{leaderless}.*"]))
        await js.publish(f"{leaderless}.event", b"e", timeout=2)
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(js, spec, publishing_an_event, ack_policy=AckPolicy.ACK, metrics=metrics)
    await js.publish(f"{spec.stream}.x", b"m")
    await _run_until(runner, done)
    assert attempts == [1, 2, 3, 4, 5], "delivered past max_deliver while no stream answered"
    assert (await js.stream_info(leaderless)).state.messages == 1
    letters = await js.stream_info(DEAD_LETTERS.name, subjects_filter=f"agentbus.deadletter.{spec.stream}.>")
    assert letters.state.subjects in (None, {}), "nothing was dead-lettered"


async def test_a_publish_whose_message_id_is_still_being_stored_is_waited_for_never_dead_lettered(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    """A cluster answers a publish retried across a failover, while the first with its message id is still
    being replicated, with a 409 (err_code 10158): the message waits, whatever max_deliver says."""
    spec = replace(
        await _consumer_on_fresh_stream(nats_client, max_deliver=2),
        dependency_retry_first_seconds=0.02,
        dependency_retry_max_seconds=0.05,
    )
    attempts: list[int] = []
    done = asyncio.Event()

    async def publishing_while_the_first_is_stored(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        if len(attempts) < 4:
            raise nats.js.errors.APIError(
                code=409, err_code=DUPLICATE_IN_PROCESS_ERR_CODE, description="duplicate message id is in process"
            )
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    js = nats_client.jetstream()
    runner = ConsumerRunner(js, spec, publishing_while_the_first_is_stored, ack_policy=AckPolicy.ACK, metrics=metrics)
    await js.publish(f"{spec.stream}.x", b"m")
    await _run_until(runner, done)
    assert attempts == [1, 2, 3, 4], "delivered past max_deliver while the first publish was stored"
    letters = await js.stream_info(DEAD_LETTERS.name, subjects_filter=f"agentbus.deadletter.{spec.stream}.>")
    assert letters.state.subjects in (None, {}), "nothing was dead-lettered"


def test_dependency_retries_back_off_exponentially_with_jitter() -> None:
    spec = replace(registry.RUNNER_SUBMISSIONS, dependency_retry_first_seconds=0.5, dependency_retry_max_seconds=30)
    rng = random.Random(7)
    delays = [dependency_retry_delay(spec, n, rng) for n in range(1, 10)]
    ceilings = [min(30.0, 0.5 * 2 ** (n - 1)) for n in range(1, 10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert delays[-1] >= 15.0


async def test_bootstrap_is_idempotent_and_updates_changed_consumers(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = nats_client.jetstream()
    again = await apply_topology(js)
    assert {c.action for c in again if c.kind != "kv"} == {"unchanged"}, "nothing changed, nothing is updated"
    assert all(c.action == "exists" for c in again if c.kind == "kv")

    changed = replace(registry.RUNNER_SUBMISSIONS, max_ack_pending=77, ack_wait_seconds=45)
    monkeypatch.setattr(
        registry, "STATIC_CONSUMERS", (changed, registry.RUNNER_CANCELLATIONS, registry.RUNNER_LLM_RESULTS)
    )
    applied = await apply_topology(js)
    assert [c.action for c in applied if c.name == changed.durable] == ["updated"]
    info = await js.consumer_info(changed.stream, changed.durable)
    assert (info.config.max_ack_pending, info.config.ack_wait) == (77, 45)
    assert info.config.max_deliver == -1, "the consumer runtime, not the server, decides when to give up"
    monkeypatch.undo()
    await apply_topology(js)
    info = await js.consumer_info(changed.stream, changed.durable)
    assert info.config.ack_wait == registry.RUNNER_SUBMISSIONS.ack_wait_seconds


async def test_health_endpoints_answer_liveness_readiness_and_metrics() -> None:
    ready = False
    registry_ = CollectorRegistry()
    ConsumerMetrics(registry_).handled.labels("c", "acked").inc()
    server = HealthServer("127.0.0.1", 0, registry_, lambda: ready)
    await server.start()

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    try:
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
        ready = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert 'agentbus_messages_handled_total{consumer="c",outcome="acked"} 1.0' in body
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
    finally:
        await server.stop()


async def test_a_handler_slower_than_ack_wait_is_kept_in_progress_not_redelivered(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = replace(await _consumer_on_fresh_stream(nats_client), ack_wait_seconds=1.0)
    await nats_client.jetstream().add_consumer(spec.stream, consumer_config(spec))
    deliveries: list[int] = []
    done = asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        await asyncio.sleep(2.5)  # two and a half ack_waits
        done.set()

    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(nats_client.jetstream(), spec, slow, ack_policy=AckPolicy.ACK, metrics=metrics)
    await nats_client.jetstream().publish(f"{spec.stream}.x", b"long job")
    await _run_until(runner, done)
    await asyncio.sleep(1.5)
    assert deliveries == [1]


async def test_a_delivery_carries_when_its_stream_stored_the_message(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = await _consumer_on_fresh_stream(nats_client)
    seen: list[Delivery] = []
    done = asyncio.Event()

    async def record(delivery: Delivery) -> None:
        seen.append(delivery)
        done.set()

    ack = await nats_client.jetstream().publish(f"{spec.stream}.x", b"{}")
    stored = await nats_client.jetstream().get_msg(spec.stream, seq=ack.seq)
    await asyncio.sleep(0.2)  # the delivery comes later than the store: the time must be the store's
    metrics = ConsumerMetrics(CollectorRegistry())
    runner = ConsumerRunner(nats_client.jetstream(), spec, record, ack_policy=AckPolicy.ACK, metrics=metrics)
    await _run_until(runner, done)

    [delivery] = seen
    assert delivery.stored_at is not None
    assert stored.time is not None
    assert abs((delivery.stored_at - stored.time).total_seconds()) < 0.001


async def test_messages_the_consumer_passes_over_are_acked_without_reaching_the_handler(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    spec = await _consumer_on_fresh_stream(nats_client)
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.subject)
        if len(handled) == 2:
            done.set()

    registry = CollectorRegistry()
    js = nats_client.jetstream()
    runner = ConsumerRunner(
        js,
        spec,
        handler,
        ack_policy=AckPolicy.ACK,
        metrics=ConsumerMetrics(registry),
        passes_over=lambda subject: subject.endswith(".other"),
    )
    for subject in ("other", "mine", "other", "other", "mine"):
        await js.publish(f"{spec.stream}.{subject}", b"{}")
    await runner.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=15)
        async with asyncio.timeout(15):
            while (await js.stream_info(spec.stream)).state.messages:  # a work queue: acked messages leave it
                await asyncio.sleep(0.05)
    finally:
        await runner.stop(drain_timeout=2)
    assert handled == [f"{spec.stream}.mine"] * 2
    labels = {"consumer": spec.durable}
    assert registry.get_sample_value("agentbus_messages_handled_total", {**labels, "outcome": "passed_over"}) == 3
    assert registry.get_sample_value("agentbus_messages_handled_total", {**labels, "outcome": "acked"}) == 2
