"""`make demo`: start the embedded suite, run sample tasks end to end, print their events, stop, exit 0.

The model is `scripted`: a deterministic offline engine for demos and tests, not a language model.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from agentbus.cli.suite import Suite
from agentbus.cli.tasks import describe, submit_task
from agentbus.contracts.tasks import TaskSubmitted
from agentbus.runtime.connection import connect_nats

SAMPLE_TASKS = (
    (
        "assistant",
        "What is calculator((17+25)*3), and how many words are in word_count(the quick brown fox)?",
    ),
    ("echo", "Summarise agentbus in one line."),
)


async def _run_samples(nats_url: str) -> bool:
    nc = await connect_nats(nats_url, "agentbus-demo")
    all_completed = True
    try:
        for agent, text in SAMPLE_TASKS:
            submission = TaskSubmitted(
                task_id=f"demo-{uuid.uuid4().hex[:10]}",
                tenant="demo",
                agent=agent,
                input=text,
                submitted_by="demo",
            )
            print(f"\n$ agentbus submit --tenant demo --agent {agent} --wait {text!r}")
            print(f"  task {submission.task_id} on agentbus.tasks.submit.demo")
            outcome = await submit_task(
                nc, submission, on_submitted=lambda _: None, on_event=lambda e: print(describe(e)), wait_seconds=60
            )
            all_completed = all_completed and outcome == "completed"
    finally:
        await nc.close()
    return all_completed


def main() -> None:
    state_dir = Path(".agentbus") / "demo"
    suite = Suite(state_dir, Path("agents"))
    print("Starting the embedded suite (model: scripted, a deterministic offline engine, not an LLM)")
    try:
        suite.start()
        ok = asyncio.run(_run_samples(suite.nats_url))
    finally:
        suite.stop()
    print("\ndemo " + ("finished: every task completed" if ok else "FAILED: a task did not complete"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
