"""`make demo`: start the embedded suite with identities enforced, ingest the sample corpus, run sample tasks
end to end (some wait for a human approval, given with `agentbus approvals approve`; one answers from the
corpus with citations; one opens a ticket on the sample MCP server, examples/mcp_helpdesk_server.py), print
their events, run the research-report workflow with `agentbus run-workflow --wait` (its two analyses in
parallel), hold a three-turn conversation with `agentbus submit --session` and show it with `agentbus
sessions show`, stop, exit 0.

The model is `scripted`: a deterministic offline engine for demos and tests, not a language model.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from agentbus.cli.config import CREDENTIALS_DIR_VARIABLE, IDENTITIES_FILE_VARIABLE, NATS_URL_VARIABLE
from agentbus.cli.suite import (
    CONFIGURATION_ERROR_STATUS,
    PREFERRED_GATEWAY_PORT,
    StartupError,
    Suite,
    SuiteLockedError,
)
from agentbus.cli.tasks import describe, submit_task
from agentbus.contracts.tasks import TaskApprovalPending, TaskEvent, TaskSubmitted
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import configure_logging

TENANT = "acme"
SUBMITTER = "acme-app"
APPROVER = "alice"
SAMPLE_TASKS = (
    ("assistant", "What is calculator((17+25)*3), and how many words are in word_count(the quick brown fox)?"),
    ("echo", "Summarise agentbus in one line."),
    ("ops", 'The primary database is down: create_ticket(title="primary database down", priority="high")'),
    ("support", "How long does a refund take to arrive?"),
    (
        "deploy-assistant",
        'Deploy the shop: render_manifest(name="shop", image="registry.example/shop:1.4", ports=[8080], '
        'env={"LOG_LEVEL": "info"}, replicas=2), then kubectl_apply() what it rendered.',
    ),
    ("helpdesk", 'The VPN is down: helpdesk__open_ticket(title="VPN down for the Berlin office", priority="high")'),
)
"""One task per sample agent, the same as in examples/README.md."""
SAMPLE_CORPUS = "examples/corpus/support"
SESSION = "demo-chat"
SESSION_TURNS = (
    "My order number is 4417.",
    "What is calculator(4417*2)?",
    "Which order number did I give you?",
)
"""A three-turn conversation with the assistant (memory store `conversations`), shown with `agentbus sessions`."""
SAMPLE_WORKFLOW = ("research-report", "--input", "topic=AI agents in 2026", "--input", "depth=deep")


def _cli(suite: Suite, *arguments: str) -> None:
    """Run an `agentbus` command as a person would, against the demo's server and credentials."""
    env = {**os.environ, NATS_URL_VARIABLE: suite.nats_url}
    if suite.enforce_identities:
        env[CREDENTIALS_DIR_VARIABLE] = str(suite.credentials.directory)
        env[IDENTITIES_FILE_VARIABLE] = str(suite.identities_path)
    print(f"\n$ agentbus {' '.join(arguments)}", flush=True)
    subprocess.run([sys.executable, "-m", "agentbus.cli.main", *arguments], env=env, check=True)


async def _run_samples(suite: Suite) -> bool:
    credential = suite.credential(f"submitter-{SUBMITTER}")
    nc = await connect_nats(
        suite.nats_url,
        "agentbus-demo",
        user=credential.user if credential else None,
        password=credential.password if credential else None,
    )
    loop = asyncio.get_running_loop()
    decisions: list[asyncio.Future[None]] = []

    def on_event(event: TaskEvent) -> None:
        print(describe(event), flush=True)
        if isinstance(event, TaskApprovalPending):
            # The approver answers from another terminal: here, the real CLI in a thread.
            approve = ("approvals", "approve", event.approval_id, "--as", APPROVER, "--reason", "on-call agrees")
            decisions.append(loop.run_in_executor(None, _approvals_then(suite, approve)))

    all_completed = True
    try:
        for agent, text in SAMPLE_TASKS:
            submission = TaskSubmitted(task_id=f"demo-{uuid.uuid4().hex[:10]}", tenant=TENANT, agent=agent, input=text)
            print(f"\n$ agentbus submit --tenant {TENANT} --agent {agent} --wait {text!r}")
            print(f"  task {submission.task_id} on agentbus.tasks.submit.{TENANT}.{SUBMITTER}", flush=True)
            outcome = await submit_task(
                nc, submission, SUBMITTER, on_submitted=lambda _: None, on_event=on_event, wait_seconds=90
            )
            all_completed = all_completed and outcome == "completed"
        await asyncio.gather(*decisions)
    finally:
        await nc.close()
    return all_completed


def _approvals_then(suite: Suite, approve: tuple[str, ...]) -> Callable[[], None]:
    def run() -> None:
        _cli(suite, "approvals", "list", "--tenant", TENANT, "--as", APPROVER)
        _cli(suite, *approve)

    return run


def main() -> None:
    configure_logging("CRITICAL", "agentbus-demo")
    state_dir = Path(".agentbus") / "demo"
    # Each demo starts from nothing: no approvals, ledger or streams left from an earlier run.
    shutil.rmtree(state_dir, ignore_errors=True)
    suite = Suite(state_dir, Path("agents"), enforce_identities=True)
    print("Starting the embedded suite (model: scripted, a deterministic offline engine, not an LLM)")
    failure = "a task did not complete"
    ok = False
    inbox = f"http://127.0.0.1:{PREFERRED_GATEWAY_PORT}/inbox"
    try:
        suite.start()
        inbox = f"{suite.gateway_url or inbox.removesuffix('/inbox')}/inbox"
        _cli(suite, "ingest", TENANT, SAMPLE_CORPUS)
        ok = asyncio.run(_run_samples(suite))
        _cli(suite, "run-workflow", *SAMPLE_WORKFLOW, "--wait")
        # A conversation: each turn continues the session, and sees the turns before it as history.
        for text in SESSION_TURNS:
            _cli(suite, "submit", "--tenant", TENANT, "--agent", "assistant", "--session", SESSION, "--wait", text)
        _cli(suite, "sessions", "show", SESSION, "--tenant", TENANT)
        _cli(suite, "sessions", "list", "--tenant", TENANT)
    except (StartupError, SuiteLockedError) as exc:
        print(f"\ndemo FAILED: {exc}")
        sys.exit(CONFIGURATION_ERROR_STATUS if isinstance(exc, StartupError) else 1)
    except subprocess.CalledProcessError as exc:
        ok = False
        failure = f"`agentbus {' '.join(exc.cmd[3:])}` exited with {exc.returncode}"
    finally:
        suite.stop()
    print("\ndemo " + ("finished: every task completed" if ok else f"FAILED: {failure}"))
    print(
        f"The approvals inbox: {inbox} while `make up` runs (log in as {APPROVER} with the password in "
        f".agentbus/credentials/approver-{APPROVER}.json)"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
