"""Submit a task and follow its events with plain nats-py: no agentbus import, only the wire contract.

    uv run agentbus up      # in another terminal: it writes ./.agentbus/env and ./.agentbus/credentials/
    uv run python examples/plain_nats_client.py [URL [CREDENTIALS_FILE]]

The URL defaults to $AGENTBUS_NATS_URL, then the one in ./.agentbus/env; the credentials file to
./.agentbus/credentials/submitter-acme-app.json when it exists. Without one it connects anonymously (a
server that enforces no identities) as `anonymous`.
"""

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import nats

TERMINAL = {"rejected", "completed", "failed", "cancelled", "budget_exceeded"}
TENANT = "acme"


async def main(url: str, credential: dict) -> int:
    # The credentials `agentbus up` wrote: user `submitter-<name>`, its password and its own inbox prefix
    # (replies to this user arrive only there, so no other user can read them).
    user = credential.get("user")
    submitter = user.removeprefix("submitter-") if user else "anonymous"
    nc = await nats.connect(
        url,
        user=user,
        password=credential.get("password"),
        inbox_prefix=credential.get("inbox_prefix", f"_INBOX_{user}" if user else "_INBOX"),
    )
    task_id = f"example-{uuid.uuid4().hex[:8]}"
    # Subscribe to the task's events before submitting it, so no event can be missed.
    live = await nc.subscribe(f"agentbus.tasks.events.{TENANT}.{task_id}")
    task = {
        "schema_version": 1,
        "task_id": task_id,
        "tenant": TENANT,
        "agent": "assistant",
        "input": "What is calculator(19*23)?",
    }
    # The subject names the submitter (the server lets each user publish only as itself); Nats-Msg-Id = task_id.
    await nc.jetstream().publish(
        f"agentbus.tasks.submit.{TENANT}.{submitter}", json.dumps(task).encode(), headers={"Nats-Msg-Id": task_id}
    )

    async def stored_events(from_seq: int) -> list[dict]:
        # What the stream holds, from the runner: for anything the live subscription missed.
        request = json.dumps({"from_seq": from_seq}).encode()
        reply = await nc.request(f"agentbus.tasks.replay.{TENANT}.{task_id}", request, timeout=10)
        return json.loads(reply.data)["events"]

    next_seq = 1
    while True:
        try:
            batch = [json.loads((await live.next_msg(timeout=5)).data)]
            if batch[0]["kind"] != "token" and batch[0]["seq"] > next_seq:
                batch = await stored_events(next_seq)  # a gap: read what came before it first
        except nats.errors.TimeoutError:
            batch = await stored_events(next_seq)  # quiet for a while: a reconnect may have dropped an event
        for event in batch:
            if event["kind"] == "token" or event["seq"] < next_seq:
                continue
            next_seq = event["seq"] + 1
            print(event["seq"], event["kind"], event.get("output") or event.get("error") or "")
            if event["kind"] in TERMINAL:
                await nc.close()
                return 0 if event["kind"] == "completed" else 1


STATE_DIR = Path(".agentbus")


def default_url() -> str:
    """$AGENTBUS_NATS_URL, then the AGENTBUS_NATS_URL=... line `agentbus up` wrote, then the usual port."""
    if os.environ.get("AGENTBUS_NATS_URL"):
        return os.environ["AGENTBUS_NATS_URL"]
    env_file = STATE_DIR / "env"
    lines = env_file.read_text().splitlines() if env_file.exists() else []
    urls = [line.partition("=")[2].strip() for line in lines if line.startswith("AGENTBUS_NATS_URL=")]
    return urls[0] if urls else "nats://127.0.0.1:4222"


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else default_url()
    credentials_file = Path(sys.argv[2]) if len(sys.argv) > 2 else STATE_DIR / "credentials" / "submitter-acme-app.json"
    credential = json.loads(credentials_file.read_text()) if len(sys.argv) > 2 or credentials_file.exists() else {}
    sys.exit(asyncio.run(main(url, credential)))
