"""What memory adds to a one-step task: the same agent with and without a session, as `agentbus up` runs it.

Figures, not a test. One suite (identities enforced, engine `scripted`: a deterministic offline engine, NOT a
language model), with two agents alike but for memory: `echo` (no memory store) and `echo-memory`
(`memory: bench-conversations`, nats-kv, history bounded at `--history` messages, no compression). The
suite is, with `--system suite` (the default), the suite benchmark's (bench_tasks.py): every service, budgets
on, the agents naming the shipped guardrails, the shipped limits decided on every call; with `--system
runner-worker`, only the agent-runner and the inference-worker, budgets off: the least a task costs, so what
memory adds weighs most there. Tasks are submitted one at a time, each after the previous one
completed, alternating task by task between `echo` (no session) and `echo-memory` (every task of a round in
one session, so each reads and writes a session of up to `--history` messages); submit-to-completed
latencies, medians over every round. With `--consecutive N`, N tasks of each in a row: a session's turn is
then submitted the moment the turn before it completed, maybe before that turn left the session (it then
waits for the leave, `queued`; how many did is printed). With `--gap-ms`, the client idles that long after
each task: a task then starts once the runner has finished with the one before (its session leave included),
which otherwise overlaps the next task, whichever kind it is.

    uv run python bench/bench_sessions.py [--system suite|runner-worker] [--tasks 200] [--repeat 3] [--history 20]
        [--consecutive 1] [--gap-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import yaml
from agentbus.cli.identities import submitter_user
from agentbus.cli.suite import Suite
from agentbus.contracts import registry
from agentbus.contracts.registry import Service
from bench_tasks import (
    IDENTITIES_YAML,
    MSG_ID,
    REPO_ROOT,
    SUBMITTER,
    TENANT,
    Completions,
    _bench_config,
    _guarded_agents,
    _inbox,
    say,
)
from nats.aio.msg import Msg
from nats.js import JetStreamContext

ECHO = (REPO_ROOT / "agents" / "echo.yaml").read_text(encoding="utf-8")


def _folders(root: Path, history: int, guarded: bool) -> Path:
    """The agents folder: `echo` and `echo-memory`, beside a memory folder with the benchmark's store. Guarded
    (the whole suite): every sample agent, as the suite benchmark gives them (its workflows name them), each
    naming the shipped guardrails, and the sample memory stores too."""
    if guarded:
        agents: Path = _guarded_agents(root)
        echo = (agents / "echo.yaml").read_text(encoding="utf-8")
    else:
        agents = root / "agents"
        agents.mkdir(parents=True)
        (root / "memory").mkdir()
        echo = ECHO
        (agents / "echo.yaml").write_text(echo, encoding="utf-8")
    memory_agent = yaml.safe_load(echo)
    memory_agent.update(name="echo-memory", memory="bench-conversations")
    (agents / "echo-memory.yaml").write_text(yaml.safe_dump(memory_agent, sort_keys=False), encoding="utf-8")
    (root / "memory" / "bench.yaml").write_text(
        f"name: bench-conversations\ntype: nats-kv\nttl_seconds: 3600\nmax_history: {{messages: {history}}}\n",
        encoding="utf-8",
    )
    return agents


async def _block(
    js: JetStreamContext, completions: Completions, agent: str, session: str | None, n: int, tag: str, gap: float = 0.0
) -> list[float]:
    samples = []
    subject = registry.TASK_SUBMIT.format(tenant=TENANT, submitter=SUBMITTER)
    for i in range(n):
        task_id = f"{tag}-{i:05d}"
        body: dict[str, str] = {
            "task_id": task_id,
            "tenant": TENANT,
            "agent": agent,
            "input": "Say hello to the benchmark.",
        }
        if session is not None:
            body["session_id"] = session
        future = completions.expect(task_id)
        started = time.perf_counter()
        await js.publish(subject, json.dumps(body).encode(), headers={MSG_ID: task_id})
        samples.append(await asyncio.wait_for(future, timeout=30.0) - started)
        if gap:
            await asyncio.sleep(gap)
    return samples


async def _measure(suite: Suite, args: argparse.Namespace) -> tuple[dict[str, list[float]], int]:
    """Latencies of each kind of task, and how many session turns were accepted queued."""
    credential = suite.credential(submitter_user(SUBMITTER))
    assert credential is not None
    nc = await nats.connect(
        suite.nats_url,
        user=credential.user,
        password=credential.password,
        inbox_prefix=_inbox(credential.user),
    )
    completions = Completions()
    events = registry.TASK_EVENT.pattern.format(tenant=TENANT, task_id="*")
    await nc.subscribe(events, cb=completions.on_event)
    queued: set[str] = set()

    async def on_accepted(msg: Msg) -> None:
        event = json.loads(msg.data)
        if event.get("kind") == "accepted" and event.get("queued"):
            queued.add(str(event.get("task_id")))

    await nc.subscribe(events, cb=on_accepted)
    js = nc.jetstream()
    run = f"s{int(time.time())}"
    try:
        await _block(js, completions, "echo", None, 50, f"{run}-warm-a")
        await _block(js, completions, "echo-memory", f"{run}-warm", 50, f"{run}-warm-b")
        results: dict[str, list[float]] = {"no memory": [], "session": []}
        for r in range(args.repeat):
            say(f"round {r + 1}/{args.repeat}")
            session = f"{run}-session-{r}"
            # Alternating (task by task, or N by N), so the machine's drift falls on both alike.
            n, gap = args.consecutive, args.gap_ms / 1000
            for i in range(0, args.tasks, n):
                results["no memory"] += await _block(js, completions, "echo", None, n, f"{run}-{r}-{i}-a", gap)
                results["session"] += await _block(js, completions, "echo-memory", session, n, f"{run}-{r}-{i}-b", gap)
        return results, sum(1 for task_id in queued if "-warm-" not in task_id)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One-step task latency with and without a session.")
    parser.add_argument(
        "--system",
        choices=("suite", "runner-worker"),
        default="suite",
        help="every service with budgets on, as the suite benchmark (default), or the runner and worker alone",
    )
    parser.add_argument("--tasks", type=int, default=200, help="tasks per block (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="blocks of each (default 3)")
    parser.add_argument("--history", type=int, default=20, help="messages a session keeps (default 20)")
    parser.add_argument(
        "--consecutive", type=int, default=1, help="tasks of each in a row, alternating (default 1: task by task)"
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="idle time after each task, so what the runner does after a task's end is done before the next starts",
    )
    args = parser.parse_args(argv)
    whole = args.system == "suite"
    environment = {} if whole else {"AGENTBUS_RUNNER_BUDGETS_ENABLED": "false"}
    for service in ("RUNNER", "WORKER", "EXECUTOR", "ACCOUNTANT", "RETRIEVER", "TRACES"):
        environment[f"AGENTBUS_{service}_LOG_LEVEL"] = "WARNING"
    with tempfile.TemporaryDirectory(prefix="agentbus-bench-sessions-") as temporary:
        root = Path(temporary)
        agents = _folders(root, args.history, guarded=whole)
        state = root / "state"
        state.mkdir()
        (state / "identities.yaml").write_text(IDENTITIES_YAML)
        suite = Suite(
            state,
            agents,
            echo=sys.stderr,
            enforce_identities=True,
            # The suite benchmark's config: the shipped one, with the benchmark tenant's own limits.
            config_dir=_bench_config(root) if whole else REPO_ROOT / "config",
            tools_dir=REPO_ROOT / "tools",
            only=None if whole else frozenset({Service.AGENT_RUNNER, Service.INFERENCE_WORKER}),
            environment=environment,
        )
        try:
            suite.start(ready_timeout=120)
            results, queued = asyncio.run(_measure(suite, args))
        finally:
            suite.stop()
    print(f"machine: {os.cpu_count()} vCPU, Python {platform.python_version()}, {platform.platform()}")
    print(f"system: {args.system}")
    base = statistics.median(results["no memory"])
    for name, samples in results.items():
        ordered = sorted(samples)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        median = statistics.median(samples)
        print(
            f"{name:>10}: p50 {median * 1000:.2f} ms  p95 {p95 * 1000:.2f} ms  "
            f"({len(samples)} tasks; {100 * (median / base - 1):+.1f}% vs no memory)"
        )
    print(f"session turns accepted queued (the turn before had not left the session yet): {queued}")


if __name__ == "__main__":
    main()
