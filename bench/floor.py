"""The floor: the agentbus task pipeline re-made in plain nats-py, for comparison. Not agentbus code.

It imports nothing from agentbus and uses its own streams, consumers and KV bucket (all named
`BENCHFLOOR_*` / `benchfloor.*`), so it can share a nats-server with a running agentbus suite without
touching it. It makes the same hops with the same acks and the same state writes as the agent-runner and
inference-worker do for a task (see services/agent-runner/.../service.py `_transact`):

    client      publish submit (Nats-Msg-Id)
    runner      fetch submit -> KV get -> KV create (state + outbox) -> publish `accepted` event
                -> publish the run's wake-up (its deadline timer) -> publish LLM request
                -> KV update (outbox cleared) -> ack
    worker      fetch request -> publish usage -> publish result -> ack            (each publish with Nats-Msg-Id)
    runner      fetch result -> KV get -> KV update (state + outbox) -> publish `step` event
                -> publish next request, or publish `completed` event and the task's root span
                -> KV update (outbox cleared) -> ack

The runner and the worker run as separate processes, each pulling from durable consumers with the same
concurrency model as agentbus (`concurrency` messages in flight, fetches of up to `batch`). What the floor
leaves out is exactly what the comparison is about: pydantic models, validation, structlog context,
metrics, trace-context handling, the in-progress heartbeat, and the scripted engine's work (the floor's
"worker" answers by rule; it is not a language model and not the scripted engine either).

Usage (bench_tasks.py does this):  python bench/floor.py {setup|runner|worker} --url nats://...
On a server that enforces identities, BENCHFLOOR_NATS_USER and BENCHFLOOR_NATS_PASSWORD name the user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

PREFIX = "benchfloor"
SUBMIT_STREAM = "BENCHFLOOR_TASKS"
EVENTS_STREAM = "BENCHFLOOR_TASK_EVENTS"
REQUESTS_STREAM = "BENCHFLOOR_LLM_REQUESTS"
RESULTS_STREAM = "BENCHFLOOR_LLM_RESULTS"
USAGE_STREAM = "BENCHFLOOR_USAGE"
TIMERS_STREAM = "BENCHFLOOR_TIMERS"
SPANS_STREAM = "BENCHFLOOR_SPANS"
RUNS_BUCKET = "BENCHFLOOR_RUNS"
RUNNER_SUBMISSIONS = "benchfloor-runner-submissions"
RUNNER_RESULTS = "benchfloor-runner-llm-results"
WORKER_REQUESTS = "benchfloor-worker-scripted"
MODEL = "scripted"
MSG_ID = "Nats-Msg-Id"
TRACEPARENT = "traceparent"
PUBLISH_TIMEOUT = 5.0
_TOOL_CALL = re.compile(r"\b\w+\(")

MAX_CONFLICT_RETRIES = 20

Handler = Callable[[Msg], Coroutine[Any, Any, None]]
Decision = tuple[dict[str, Any], list[dict[str, str]]]
Decide = Callable[[dict[str, Any] | None], Decision | None]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --- topology --------------------------------------------------------------------------------------


async def setup(url: str) -> None:
    """Create the floor's streams, consumers and bucket, configured like agentbus's (file storage,
    the same duplicate windows and consumer limits)."""
    nc = await _connect(url, "benchfloor-setup")
    js = nc.jetstream()
    streams = (
        (SUBMIT_STREAM, f"{PREFIX}.tasks.submit.*", RetentionPolicy.WORK_QUEUE, 7 * 86400.0),
        (EVENTS_STREAM, f"{PREFIX}.tasks.events.*.*", RetentionPolicy.LIMITS, 30 * 86400.0),
        (REQUESTS_STREAM, f"{PREFIX}.llm.requests.*", RetentionPolicy.WORK_QUEUE, 86400.0),
        (RESULTS_STREAM, f"{PREFIX}.llm.results.*", RetentionPolicy.WORK_QUEUE, 86400.0),
        (USAGE_STREAM, f"{PREFIX}.usage.*", RetentionPolicy.LIMITS, 30 * 86400.0),
        (TIMERS_STREAM, f"{PREFIX}.runs.schedules.*.*", RetentionPolicy.LIMITS, 86400.0),
        (SPANS_STREAM, f"{PREFIX}.spans.*", RetentionPolicy.LIMITS, 86400.0),
    )
    for name, subject, retention, max_age in streams:
        config = StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            max_age=max_age,
            duplicate_window=7200.0,
        )
        try:
            await js.stream_info(name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
    consumers = (
        (SUBMIT_STREAM, RUNNER_SUBMISSIONS, f"{PREFIX}.tasks.submit.*", 30.0, 5, 1000),
        (RESULTS_STREAM, RUNNER_RESULTS, f"{PREFIX}.llm.results.*", 30.0, 5, 1000),
        (REQUESTS_STREAM, WORKER_REQUESTS, f"{PREFIX}.llm.requests.{MODEL}", 60.0, 4, 256),
    )
    for stream, durable, filter_subject, ack_wait, max_deliver, max_ack_pending in consumers:
        await js.add_consumer(
            stream,
            ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=filter_subject,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                max_ack_pending=max_ack_pending,
            ),
        )
    try:
        await js.key_value(RUNS_BUCKET)
    except NotFoundError:
        await js.create_key_value(bucket=RUNS_BUCKET, history=1, storage=StorageType.FILE)
    await nc.close()


async def _connect(url: str, name: str) -> NatsClient:
    user = os.environ.get("BENCHFLOOR_NATS_USER") or None
    password = os.environ.get("BENCHFLOOR_NATS_PASSWORD") or None
    return await nats.connect(url, name=name, user=user, password=password)


# --- the pull loop (what agentbus's ConsumerRunner does, minus metrics/logging/heartbeats) ---------


async def _guarded(handler: Handler, msg: Msg) -> None:
    try:
        await handler(msg)
    except Exception as exc:
        print(f"floor: handler failed on {msg.subject}: {exc!r}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            await msg.nak(delay=1.0)


async def pull_loop(sub: JetStreamContext.PullSubscription, handler: Handler, concurrency: int, batch: int) -> None:
    in_flight: set[asyncio.Task[None]] = set()
    slot_freed = asyncio.Event()

    def release(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        slot_freed.set()

    while True:
        free = concurrency - len(in_flight)
        if free <= 0:
            slot_freed.clear()
            await slot_freed.wait()
            continue
        try:
            msgs = await sub.fetch(min(batch, free), timeout=2.0)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        for msg in msgs:
            task = asyncio.create_task(_guarded(handler, msg))
            in_flight.add(task)
            task.add_done_callback(release)


# --- the runner ------------------------------------------------------------------------------------


class FloorRunner:
    """Run state in KV with an outbox, written compare-and-set: the same reads and writes as agentbus.

    Like agentbus's `_transact`: read the record; re-publish a leftover outbox (deduplicated by the
    server); decide; store state + outbox (retry from the read on a revision conflict); publish the
    outbox; store the record again with the outbox cleared (a conflict there means a newer transition
    was stored, which is fine); then the caller acks.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv

    async def _publish(self, outbox: list[dict[str, str]], traceparent: str) -> None:
        for item in outbox:
            await self._js.publish(
                item["subject"],
                item["payload"].encode(),
                headers={MSG_ID: item["msg_id"], TRACEPARENT: traceparent},
                timeout=PUBLISH_TIMEOUT,
            )

    async def _clear_outbox(self, task_id: str, state: dict[str, Any], revision: int) -> None:
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self._kv.update(task_id, _dumps({"state": state, "outbox": []}), last=revision)

    async def _transact(self, task_id: str, decide: Decide, *, absent: bool = False) -> None:
        """`absent`: a new task's run, created without being read first (as the runner does); a taken id fails
        the create and is read."""
        for _ in range(MAX_CONFLICT_RETRIES):
            if absent:
                record, revision, absent = None, 0, False
            else:
                try:
                    entry = await self._kv.get(task_id)
                except KeyNotFoundError:
                    record, revision = None, 0
                else:
                    record, revision = json.loads(entry.value or b"null"), entry.revision or 0
            if record is not None and record["outbox"]:
                await self._publish(record["outbox"], record["state"]["traceparent"])
            decision = decide(record["state"] if record is not None else None)
            if decision is None:
                if record is not None and record["outbox"]:
                    await self._clear_outbox(task_id, record["state"], revision)
                return
            state, outbox = decision
            try:
                if record is None:
                    revision = await self._kv.create(task_id, _dumps({"state": state, "outbox": outbox}))
                else:
                    revision = await self._kv.update(task_id, _dumps({"state": state, "outbox": outbox}), last=revision)
            except KeyWrongLastSequenceError:
                continue
            await self._publish(outbox, state["traceparent"])
            await self._clear_outbox(task_id, state, revision)
            return
        raise RuntimeError(f"run {task_id} kept changing")

    @staticmethod
    def _event(state: dict[str, Any], kind: str, **fields: Any) -> dict[str, str]:
        seq = state["next_seq"]
        state["next_seq"] = seq + 1
        task_id = state["task_id"]
        payload = {"schema_version": 1, "task_id": task_id, "tenant": state["tenant"], "seq": seq, "kind": kind}
        payload.update(fields)
        return {
            "subject": f"{PREFIX}.tasks.events.{state['tenant']}.{task_id}",
            "msg_id": f"event:{task_id}:{seq}",
            "payload": json.dumps(payload, separators=(",", ":")),
        }

    @staticmethod
    def _request(state: dict[str, Any]) -> dict[str, str]:
        step = state["step"] + 1
        state["step"] = step
        request_id = f"{state['task_id']}.step-{step}"
        state["awaiting"] = request_id
        payload = {
            "schema_version": 1,
            "request_id": request_id,
            "task_id": state["task_id"],
            "tenant": state["tenant"],
            "model": MODEL,
            "step": step,
            "steps": state["steps"],
            "input": state["input"],
        }
        return {
            "subject": f"{PREFIX}.llm.requests.{MODEL}",
            "msg_id": f"llm:{request_id}",
            "payload": json.dumps(payload, separators=(",", ":")),
        }

    async def on_submit(self, msg: Msg) -> None:
        submission = json.loads(msg.data)
        traceparent = (msg.headers or {}).get(TRACEPARENT, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")

        def decide(current: dict[str, Any] | None) -> Decision | None:
            if current is not None:
                return None  # a repeated submission starts nothing
            user_input: str = submission["input"]
            state: dict[str, Any] = {
                "task_id": submission["task_id"],
                "tenant": submission["tenant"],
                "agent": submission["agent"],
                "input": user_input,
                "steps": 1 + len(_TOOL_CALL.findall(user_input)),
                "step": 0,
                "next_seq": 1,
                "awaiting": None,
                "status": "running",
                "traceparent": traceparent,
            }
            accepted = self._event(state, "accepted", agent=state["agent"], model=MODEL)
            wake = {
                "subject": f"{PREFIX}.runs.schedules.{state['tenant']}.{state['task_id']}",
                "msg_id": f"wake:{state['task_id']}:1",
                "payload": json.dumps({"task_id": state["task_id"], "kind": "deadline"}),
            }
            return state, [accepted, wake, self._request(state)]

        await self._transact(submission["task_id"], decide, absent=True)
        await msg.ack()

    async def on_result(self, msg: Msg) -> None:
        result = json.loads(msg.data)

        def decide(current: dict[str, Any] | None) -> Decision | None:
            if current is None or current["status"] != "running" or current["awaiting"] != result["request_id"]:
                return None  # unknown run, stale or repeated result
            state = dict(current)
            outbox = [self._event(state, "step", step=result["step"], finish_reason=result["finish_reason"])]
            if result["finish_reason"] == "tool_calls":
                outbox.append(self._request(state))
            else:
                state["status"] = "completed"
                state["awaiting"] = None
                outbox.append(self._event(state, "completed", output=result["content"], steps=state["step"]))
                span = {"task_id": state["task_id"], "kind": "task", "steps": state["step"]}
                outbox.append(
                    {
                        "subject": f"{PREFIX}.spans.runner",
                        "msg_id": f"span:{state['task_id']}",
                        "payload": json.dumps(span, separators=(",", ":")),
                    }
                )
            return state, outbox

        await self._transact(result["task_id"], decide)
        await msg.ack()


# --- the worker ------------------------------------------------------------------------------------


class FloorWorker:
    """Answers each request by rule (tool call until the last step, then text): no engine, no LLM."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def on_request(self, msg: Msg) -> None:
        request = json.loads(msg.data)
        request_id: str = request["request_id"]
        tenant: str = request["tenant"]
        last_step = request["step"] >= request["steps"]
        traceparent = (msg.headers or {}).get(TRACEPARENT, "")
        usage = {
            "schema_version": 1,
            "usage_id": f"llm:{request_id}",
            "kind": "llm",
            "tenant": tenant,
            "task_id": request["task_id"],
            "model": MODEL,
            "prompt_tokens": len(request["input"].split()),
            "completion_tokens": 3,
        }
        result = {
            "schema_version": 1,
            "request_id": request_id,
            "task_id": request["task_id"],
            "tenant": tenant,
            "model": MODEL,
            "step": request["step"],
            "finish_reason": "stop" if last_step else "tool_calls",
            "content": f"[floor] answered: {request['input']}" if last_step else "",
        }
        await self._js.publish(
            f"{PREFIX}.usage.{tenant}",
            _dumps(usage),
            headers={MSG_ID: usage["usage_id"], TRACEPARENT: traceparent},
            timeout=PUBLISH_TIMEOUT,
        )
        await self._js.publish(
            f"{PREFIX}.llm.results.{tenant}",
            _dumps(result),
            headers={MSG_ID: f"result:{request_id}", TRACEPARENT: traceparent},
            timeout=PUBLISH_TIMEOUT,
        )
        await msg.ack()


# --- processes -------------------------------------------------------------------------------------


async def serve(role: str, url: str, concurrency: int, batch: int) -> None:
    nc: NatsClient = await _connect(url, f"benchfloor-{role}")
    js = nc.jetstream()
    loops: list[asyncio.Task[None]] = []
    if role == "runner":
        runner = FloorRunner(js, await js.key_value(RUNS_BUCKET))
        for stream, durable, handler in (
            (SUBMIT_STREAM, RUNNER_SUBMISSIONS, runner.on_submit),
            (RESULTS_STREAM, RUNNER_RESULTS, runner.on_result),
        ):
            sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
            loops.append(asyncio.create_task(pull_loop(sub, handler, concurrency, batch)))
    else:
        worker = FloorWorker(js)
        sub = await js.pull_subscribe_bind(durable=WORKER_REQUESTS, stream=REQUESTS_STREAM)
        loops.append(asyncio.create_task(pull_loop(sub, worker.on_request, concurrency, batch)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for task in loops:
        task.cancel()
    for task in loops:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    with contextlib.suppress(Exception):
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", choices=["setup", "runner", "worker"])
    parser.add_argument("--url", required=True, help="NATS URL")
    parser.add_argument("--concurrency", type=int, default=64, help="messages in flight per consumer")
    parser.add_argument("--batch", type=int, default=64, help="messages per fetch")
    args = parser.parse_args(argv)
    if args.role == "setup":
        asyncio.run(setup(args.url))
    else:
        asyncio.run(serve(args.role, args.url, args.concurrency, args.batch))


if __name__ == "__main__":
    main()
