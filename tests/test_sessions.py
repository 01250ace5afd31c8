"""Sessions over the real bus: a runner and an inference worker on a nats-server of this module, memory stores
in `memory/*.yaml` of a folder of its own (NATS KV and Redis), the model a small OpenAI-compatible HTTP server
that records every request it receives.

Each test starts the services it needs and stops them, so a test may restart the suite between turns.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.memory import MemorySpecError
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.retriever.app import create_app as create_retriever
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.testing import nats_server_or_skip, skip_outside_ci
from cli_support import agentbus, assert_one_line_error
from helpers import new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient

REDIS_URL = os.environ.get("AGENTBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SUBMITTER = "acme-app"

AGENTS: dict[str, dict[str, Any]] = {
    "chat.yaml": {
        "name": "chat",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "conversations",
    },
    "chat-redis.yaml": {
        "name": "chat-redis",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "redis-conversations",
    },
    "chat-postgres.yaml": {
        "name": "chat-postgres",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "postgres-conversations",
    },
    "chat-short.yaml": {
        "name": "chat-short",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "short",
    },
    "chat-strict.yaml": {
        "name": "chat-strict",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "strict",
    },
    "chat-summarized.yaml": {
        "name": "chat-summarized",
        "model": "fake-gpt",
        "system_prompt": "You are a helpful assistant.",
        "max_steps": 2,
        "memory": "summarized",
    },
    "stateless.yaml": {"name": "stateless", "model": "fake-gpt", "system_prompt": "Answer.", "max_steps": 1},
    "note-keeper.yaml": {
        "name": "note-keeper",
        "model": "fake-gpt",
        "system_prompt": "You keep each user's notes.",
        "max_steps": 3,
        "memory": "own-facts",
        "tools": ["remember", "recall"],
    },
    "keeper.yaml": {
        "name": "keeper",
        "model": "fake-gpt",
        "system_prompt": "You remember facts for later.",
        "max_steps": 3,
        "memory": "facts",
        "tools": ["remember", "recall"],
    },
}
MEMORY: dict[str, dict[str, Any]] = {
    "conversations.yaml": {"name": "conversations", "type": "nats-kv", "ttl_seconds": 3600},
    "redis-conversations.yaml": {
        "name": "redis-conversations",
        "type": "redis",
        "ttl_seconds": 3600,
        "redis": {"url": REDIS_URL, "key_prefix": f"agentbus-test-{uuid.uuid4().hex[:8]}"},
    },
    "postgres-conversations.yaml": {
        "name": "postgres-conversations",
        "type": "postgres",
        "ttl_seconds": 3600,
        "postgres": {"url": POSTGRES_URL, "table": "agentbus_test_sessions"},
    },
    "short.yaml": {"name": "short", "type": "nats-kv", "ttl_seconds": 2},
    "strict.yaml": {"name": "strict", "type": "nats-kv", "on_busy": "reject"},
    "facts.yaml": {"name": "facts", "type": "nats-kv", "long_term": {"collection": "memories", "top_k": 3}},
    "own-facts.yaml": {"name": "own-facts", "type": "nats-kv", "long_term": {"collection": "notes", "per_user": True}},
    "summarized.yaml": {
        "name": "summarized",
        "type": "nats-kv",
        "max_history": {"messages": 20},
        "compression": {"threshold": 3, "keep_recent": 2, "model": "fake-gpt"},
    },
}


class FakeOpenAI:
    """An OpenAI-compatible chat completions server that records each request's messages and answers
    `answer #<n> to: <last user message>` (a summary request: `SUMMARY(<n> user lines)`), after `delay`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    number = len(fake.requests)
                if fake.delay:
                    threading.Event().wait(fake.delay)
                messages = body["messages"]
                last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
                calls: list[dict[str, Any]] = []
                if messages[-1]["role"] == "tool":
                    content = f"noted: {messages[-1]['content']}"
                elif body.get("tools") and ("remember: " in last_user or "recall: " in last_user):
                    tool, _, argument = last_user.partition(": ")
                    name, key = ("remember", "fact") if tool == "remember" else ("recall", "query")
                    arguments = json.dumps({key: argument})
                    calls = [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]
                    content = ""
                elif "You summarize conversations" in messages[0]["content"]:
                    users = [line for line in last_user.splitlines() if line.startswith("User: ")]
                    content = "SUMMARY(" + " | ".join(u.removeprefix("User: ") for u in users) + ")"
                else:
                    content = f"answer #{number} to: {last_user}"
                reply = {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": content,
                                **({"tool_calls": calls} if calls else {}),
                            },
                            "finish_reason": "tool_calls" if calls else "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def messages_for(self, text: str) -> list[dict[str, Any]]:
        """The messages of the (step) request whose last user message is `text`."""
        for body in self.requests:
            users = [m for m in body["messages"] if m["role"] == "user"]
            if users and users[-1]["content"] == text and "You summarize" not in body["messages"][0]["content"]:
                return list(body["messages"])
        raise AssertionError(f"no request ended with the user message {text!r}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _write(folder: Path, files: dict[str, dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    with nats_server_or_skip(tmp_path_factory.mktemp("sessions-nats")) as nats:
        yield nats


@pytest.fixture(scope="module")
def model() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sessions-specs")
    return _write(root / "agents", AGENTS), _write(root / "memory", MEMORY)


class Suite:
    """The runner and the worker of this module, started and stopped at will."""

    def __init__(self, nats: NatsServerProcess, model: FakeOpenAI, agents: Path, memory: Path) -> None:
        self._nats, self._model, self._agents, self._memory = nats, model, agents, memory
        self._services: list[BusService] = []

    async def start(self) -> None:
        self._services = [
            create_runner(
                RunnerSettings(
                    nats_url=self._nats.url,
                    agents_dir=self._agents,
                    tools_dir=self._agents / "no-tools",
                    memory_dir=self._memory,
                    routing_file=self._agents / "no-routing.yaml",
                    budgets_enabled=False,
                    drain_timeout_seconds=2,
                )
            ),
            create_worker(
                WorkerSettings(
                    nats_url=self._nats.url,
                    engine="openai",
                    models=["fake-gpt"],
                    openai_base_url=self._model.url,
                    drain_timeout_seconds=2,
                )
            ),
        ]
        for service in self._services:
            await service.start()

    async def stop(self) -> None:
        for service in self._services:
            await service.stop()
        self._services = []


@pytest_asyncio.fixture
async def suite(
    server: NatsServerProcess, model: FakeOpenAI, folders: tuple[Path, Path]
) -> AsyncIterator[tuple[Suite, NatsClient]]:
    nc = await connect_nats(server.url, "sessions-test")
    await apply_topology(nc.jetstream(), models=("fake-gpt",))
    running = Suite(server, model, *folders)
    await running.start()
    try:
        yield running, nc
    finally:
        await running.stop()
        await nc.close()


async def _turn(
    nc: NatsClient, agent: str, session: str, text: str, tenant: str = "acme", submitter: str = SUBMITTER
) -> list[dict[str, Any]]:
    task_id = new_task_id("turn")
    payload = submission(task_id, tenant=tenant, agent=agent, text=text, session_id=session)
    await publish_submission(nc, payload, tenant=tenant, submitter=submitter)
    return await task_events(nc, task_id, tenant=tenant, timeout=30)


async def _ask(nc: NatsClient, op: str, body: dict[str, Any], tenant: str = "acme") -> dict[str, Any]:
    reply = await nc.request(f"agentbus.sessions.{op}.{tenant}.{SUBMITTER}", json.dumps(body).encode(), timeout=10)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


def _contents(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.mark.parametrize("agent", ["chat", "chat-redis", "chat-postgres"])
async def test_three_turns_carry_the_conversation_so_far(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI, agent: str
) -> None:
    _, nc = suite
    await _server_or_skip(agent)
    session = f"s-{uuid.uuid4().hex[:8]}"
    texts = [f"{session}: my name is Ada", f"{session}: I live in Paris", f"{session}: where do I live?"]
    answers = []
    for text in texts:
        events = await _turn(nc, agent, session, text)
        assert events[0]["kind"] == "accepted"
        assert events[0]["session_id"] == session
        assert events[-1]["kind"] == "completed", events[-1]
        answers.append(events[-1]["output"])
    third = _contents(model.messages_for(texts[2]))
    assert third == [
        ("system", "You are a helpful assistant."),
        ("user", texts[0]),
        ("assistant", answers[0]),
        ("user", texts[1]),
        ("assistant", answers[1]),
        ("user", texts[2]),
    ]
    shown = await _ask(nc, "show", {"session_id": session})
    assert shown.get("error") is None
    [detail] = shown["sessions"]
    assert detail["turns"] == 3
    assert detail["running"] is None
    assert detail["submitter"] == SUBMITTER
    assert [turn["messages"][0]["content"] for turn in detail["history"]] == texts
    listed = await _ask(nc, "list", {})
    assert session in [s["session_id"] for s in listed["sessions"]]


async def test_a_restarted_suite_goes_on_with_the_conversation(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI
) -> None:
    running, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    texts = [f"{session}: remember 42", f"{session}: and 7", f"{session}: what numbers?"]
    answers = []
    for text in texts:
        events = await _turn(nc, "chat", session, text)
        assert events[-1]["kind"] == "completed", events[-1]
        answers.append(events[-1]["output"])
        await running.stop()
        await running.start()
    third = _contents(model.messages_for(texts[2]))
    assert third[1:] == [
        ("user", texts[0]),
        ("assistant", answers[0]),
        ("user", texts[1]),
        ("assistant", answers[1]),
        ("user", texts[2]),
    ]


async def test_past_the_threshold_the_oldest_turns_become_a_summary(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI
) -> None:
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    texts = [f"{session}: fact {n}" for n in range(1, 4)]
    usage = []
    for text in texts:
        events = await _turn(nc, "chat-summarized", session, text)
        assert events[-1]["kind"] == "completed", events[-1]
        usage.append(events[-1]["usage"]["prompt_tokens"])
    # The summary is an LLM step of the task that needed it: its tokens are the task's (the fake server counts
    # 10 prompt tokens a request), so turn 3 made two requests.
    assert usage == [10, 10, 20]
    [summary] = [
        body["messages"][-1]["content"]
        for body in model.requests
        if "You summarize" in body["messages"][0]["content"] and session in body["messages"][-1]["content"]
    ]
    assert f"User: {texts[0]}" in summary
    assert texts[1] not in summary
    # Turn 3 found 4 messages (past the threshold of 3; keep_recent 2): turn 1 was summarized first, as an LLM
    # step of the task, and turn 3's request carries the summary and turn 2 verbatim.
    third = _contents(model.messages_for(texts[2]))
    assert third[0] == ("system", "You are a helpful assistant.")
    assert third[1][0] == "system"
    assert f"SUMMARY({texts[0]})" in third[1][1]
    assert [m for m in third[2:] if m[0] == "user"] == [("user", texts[1]), ("user", texts[2])]
    assert texts[0] not in json.dumps(third[2:])
    [detail] = (await _ask(nc, "show", {"session_id": session}))["sessions"]
    assert detail["summarized_turns"] == 1
    assert f"SUMMARY({texts[0]})" == detail["summary"]


async def test_tenants_and_submitters_never_share_a_session(suite: tuple[Suite, NatsClient], model: FakeOpenAI) -> None:
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    secret = f"{session}: acme's secret is 1234"
    assert (await _turn(nc, "chat", session, secret))[-1]["kind"] == "completed"
    for tenant, submitter in (("globex", SUBMITTER), ("acme", "someone-else")):
        question = f"{session}: what is the secret? ({tenant}/{submitter})"
        events = await _turn(nc, "chat", session, question, tenant=tenant, submitter=submitter)
        assert events[-1]["kind"] == "completed"
        assert secret not in json.dumps(model.messages_for(question))
    assert (await _ask(nc, "show", {"session_id": session}, tenant="globex"))["sessions"][0]["turns"] == 1
    assert (await _ask(nc, "show", {"session_id": session}))["sessions"][0]["turns"] == 1


@pytest.mark.parametrize("agent", ["chat", "chat-redis", "chat-postgres"])
async def test_delete_forgets_a_session(suite: tuple[Suite, NatsClient], model: FakeOpenAI, agent: str) -> None:
    _, nc = suite
    await _server_or_skip(agent)
    session = f"s-{uuid.uuid4().hex[:8]}"
    first = f"{session}: forget me"
    assert (await _turn(nc, agent, session, first))[-1]["kind"] == "completed"
    store = AGENTS[f"{agent}.yaml"]["memory"]
    assert (await _ask(nc, "delete", {"session_id": session}))["deleted"] == [store]
    assert (await _ask(nc, "show", {"session_id": session}))["sessions"] == []
    again = f"{session}: who am I?"
    assert (await _turn(nc, agent, session, again))[-1]["kind"] == "completed"
    assert _contents(model.messages_for(again))[1:] == [("user", again)]


async def test_an_idle_session_expires_after_its_ttl(suite: tuple[Suite, NatsClient], model: FakeOpenAI) -> None:
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    first, later = f"{session}: short-lived", f"{session}: still there?"
    assert (await _turn(nc, "chat-short", session, first))[-1]["kind"] == "completed"
    assert (await _ask(nc, "show", {"session_id": session}))["sessions"][0]["turns"] == 1
    await asyncio.sleep(3.5)  # the store's TTL is 2 s
    assert (await _ask(nc, "show", {"session_id": session}))["sessions"] == []
    assert (await _turn(nc, "chat-short", session, later))[-1]["kind"] == "completed"
    assert _contents(model.messages_for(later))[1:] == [("user", later)]


async def test_redis_sessions_expire_after_their_ttl() -> None:
    """The Redis store on its own: a write renews the TTL, an idle session is gone after it."""
    from agentbus.agent_runner.adapters.redis_session_store import RedisSessionStore
    from agentbus.agent_runner.sessions import SessionKey, new_record
    from agentbus.contracts.common import utc_now

    await _redis_or_skip()
    store = RedisSessionStore.from_url(REDIS_URL, "ttl-test", 1, f"agentbus-test-{uuid.uuid4().hex[:8]}")
    try:
        key = SessionKey("ttl-test", "acme", SUBMITTER, "s-ttl")
        revision = await store.create(key, new_record(key, utc_now()))
        found = await store.get(key)
        assert found is not None
        assert found[1] == revision
        await asyncio.sleep(1.6)
        assert await store.get(key) is None
    finally:
        await store.close()


async def test_concurrent_turns_of_a_session_run_one_at_a_time(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI
) -> None:
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    texts = [f"{session}: concurrent {n}" for n in range(3)]
    model.delay = 0.3
    try:
        results = await asyncio.gather(*(_turn(nc, "chat", session, text) for text in texts))
    finally:
        model.delay = 0.0
    assert all(events[-1]["kind"] == "completed" for events in results)
    assert sum(1 for events in results if events[0]["queued"]) >= 1
    # One at a time: each turn's request carries every turn that ended before it, so the three requests
    # see 0, 1 and 2 earlier turns, in some order.
    seen = sorted(sum(1 for m in model.messages_for(text) if m["role"] == "user") - 1 for text in texts)
    assert seen == [0, 1, 2]
    [detail] = (await _ask(nc, "show", {"session_id": session}))["sessions"]
    assert detail["turns"] == 3
    assert detail["running"] is None
    assert detail["waiting"] == []


async def test_a_strict_session_rejects_a_second_task_while_one_runs(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI
) -> None:
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    model.delay = 1.0
    try:
        first = asyncio.create_task(_turn(nc, "chat-strict", session, f"{session}: slow"))
        await asyncio.sleep(0.5)
        second = await _turn(nc, "chat-strict", session, f"{session}: too soon")
        busy = await _ask(nc, "delete", {"session_id": session})
        done = await first
    finally:
        model.delay = 0.0
    assert done[-1]["kind"] == "completed"
    assert second[-1]["kind"] == "rejected"
    assert second[-1]["error"]["code"] == "session_busy"
    assert busy["error"]["code"] == "session_busy"
    assert busy["deleted"] == []


async def test_a_strict_session_takes_each_turn_submitted_the_moment_the_last_one_ended(
    suite: tuple[Suite, NatsClient], model: FakeOpenAI
) -> None:
    # A run's end reaches its client before the run leaves its session: the next turn must wait for that
    # leave, not be refused `session_busy`, and must see every turn before it.
    _, nc = suite
    session = f"s-{uuid.uuid4().hex[:8]}"
    texts = [f"{session}: turn {n}" for n in range(5)]
    for n, text in enumerate(texts):
        events = await _turn(nc, "chat-strict", session, text)
        assert events[-1]["kind"] == "completed", events[-1]
        assert [content for role, content in _contents(model.messages_for(text)) if role == "user"] == texts[: n + 1]
    [detail] = (await _ask(nc, "show", {"session_id": session}))["sessions"]
    assert (detail["turns"], detail["running"], detail["waiting"]) == (5, None, [])


async def test_a_session_needs_an_agent_with_a_memory_store(suite: tuple[Suite, NatsClient]) -> None:
    _, nc = suite
    events = await _turn(nc, "stateless", "s-none", "hello")
    assert events[-1]["kind"] == "rejected"
    assert events[-1]["error"]["code"] == "session_unsupported"


async def test_a_bad_sessions_request_gets_a_clear_error(suite: tuple[Suite, NatsClient]) -> None:
    _, nc = suite
    reply = await _ask(nc, "show", {"session_id": "not an id!"})
    assert reply["error"]["code"] == "schema_violation"


def test_a_bad_memory_file_stops_start_up_naming_file_and_field(tmp_path: Path) -> None:
    agents = _write(tmp_path / "agents", {"chat.yaml": AGENTS["chat.yaml"]})
    memory = _write(
        tmp_path / "memory",
        {"conversations.yaml": {"name": "conversations", "max_history": {"messages": 4, "tokens": 10}}},
    )
    settings = RunnerSettings(agents_dir=agents, tools_dir=tmp_path / "none", memory_dir=memory)
    with pytest.raises(MemorySpecError, match=r"conversations\.yaml: field 'max_history'"):
        create_runner(settings)
    (memory / "conversations.yaml").write_text(json.dumps({"name": "other"}), encoding="utf-8")
    with pytest.raises(Exception, match=r"chat\.yaml: field 'memory': unknown memory store 'conversations'"):
        create_runner(settings)


async def _server_or_skip(agent: str) -> None:
    if agent == "chat-redis":
        await _redis_or_skip()
    elif agent == "chat-postgres":
        await _postgres_or_skip()


async def _postgres_or_skip() -> None:
    """The PostgreSQL server on this machine; without it the test skips, except under CI=true."""
    import sqlalchemy as sa
    from agentbus.agent_runner.adapters.postgres_session_store import async_url
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(async_url(POSTGRES_URL))
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        skip_outside_ci(f"postgres unavailable at {POSTGRES_URL}: {exc}")
    finally:
        await engine.dispose()


async def _redis_or_skip() -> None:
    """The Redis server on this machine; without it the test skips, except under CI=true."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, RedisError) as exc:
        skip_outside_ci(f"redis unavailable at {REDIS_URL}: {exc}")
    finally:
        await client.aclose()


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as empty:
        return await asyncio.to_thread(agentbus, *args, cwd=Path(empty), timeout=60)


async def test_the_cli_submits_to_a_session_lists_shows_and_deletes_it(
    suite: tuple[Suite, NatsClient], server: NatsServerProcess, model: FakeOpenAI
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    url = ("--nats-url", server.url)
    common = ("--tenant", "acme", "--agent", "chat", "--session", session, "--wait", *url)
    first = await _cli("submit", *common, f"{session}: I am Grace")
    assert first.returncode == 0, first.stderr
    assert f"session={session}" in first.stdout.splitlines()[0]
    second = await _cli("submit", *common, f"{session}: who am I?")
    assert second.returncode == 0, second.stderr
    assert ("user", f"{session}: I am Grace") in _contents(model.messages_for(f"{session}: who am I?"))

    listed = await _cli("sessions", "list", "--tenant", "acme", *url)
    assert listed.returncode == 0, listed.stderr
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(session)]
    assert "store conversations" in line
    assert "2 turns" in line
    shown = await _cli("sessions", "show", session, "--tenant", "acme", *url)
    assert shown.returncode == 0, shown.stderr
    assert f"user: {session}: I am Grace" in shown.stdout
    deleted = await _cli("sessions", "delete", session, "--tenant", "acme", *url)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"deleted session {session} from conversations"
    gone = await _cli("sessions", "show", session, "--tenant", "acme", *url)
    assert_one_line_error(gone, 1, f"no session {session}")
    bad = await _cli("sessions", "show", "not an id", "--tenant", "acme", *url)
    assert_one_line_error(bad, 2, "SESSION_ID")


@pytest_asyncio.fixture
async def retriever(server: NatsServerProcess, tmp_path: Path) -> AsyncIterator[None]:
    service = create_retriever(
        RetrieverSettings(
            nats_url=server.url,
            milvus_uri=str(tmp_path / "milvus.db"),
            drain_timeout_seconds=2,
            embedding_processes=0,
        )
    )
    await service.start()
    try:
        yield
    finally:
        await service.stop()


@pytest.mark.usefixtures("retriever")
async def test_remembered_facts_are_recalled_in_later_tasks_of_their_tenant_only(
    suite: tuple[Suite, NatsClient],
) -> None:
    _, nc = suite
    fact = f"the office wifi password is {uuid.uuid4().hex[:10]}"
    task_id = new_task_id("remember")
    await publish_submission(nc, submission(task_id, agent="keeper", text=f"remember: {fact}"))
    remembered = await task_events(nc, task_id, timeout=30)
    assert remembered[-1]["kind"] == "completed", remembered[-1]
    assert remembered[-1]["output"] == f"noted: Remembered: {fact}"
    # The fact reaches the index asynchronously (the retriever's ingest stream): recall until it is there.
    recalled: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while not recalled or fact not in recalled[-1].get("output", ""):
            task_id = new_task_id("recall")
            await publish_submission(nc, submission(task_id, agent="keeper", text="recall: office wifi password"))
            recalled = await task_events(nc, task_id, timeout=30)
            assert recalled[-1]["kind"] == "completed", recalled[-1]
            await asyncio.sleep(0.3)
    assert recalled[-1]["output"].startswith("noted: [1] ")
    assert any(fact in citation["text"] for citation in recalled[-1]["citations"])
    task_id = new_task_id("recall")
    await publish_submission(
        nc, submission(task_id, tenant="globex", agent="keeper", text="recall: office wifi password"), tenant="globex"
    )
    other = await task_events(nc, task_id, tenant="globex", timeout=30)
    assert other[-1]["kind"] == "completed", other[-1]
    assert fact not in json.dumps(other)


@pytest.mark.usefixtures("retriever")
async def test_per_user_memories_are_recalled_only_by_the_user_who_remembered_them(
    suite: tuple[Suite, NatsClient],
) -> None:
    _, nc = suite
    note = f"my locker code is {uuid.uuid4().hex[:8]}"

    async def ask(text: str, submitter: str) -> dict[str, Any]:
        task_id = new_task_id("note")
        await publish_submission(nc, submission(task_id, agent="note-keeper", text=text), submitter=submitter)
        events = await task_events(nc, task_id, timeout=30)
        assert events[-1]["kind"] == "completed", events[-1]
        return events[-1]

    assert (await ask(f"remember: {note}", SUBMITTER))["output"] == f"noted: Remembered: {note}"
    async with asyncio.timeout(60):
        while note not in (await ask("recall: locker code", SUBMITTER))["output"]:
            await asyncio.sleep(0.3)
    other = await ask("recall: locker code", "someone-else")
    assert note not in json.dumps(other)
