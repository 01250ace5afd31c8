"""Submit a task and follow its events with plain nats-py: no agentbus import, only the wire contract.

uv run agentbus up            # in one terminal
uv run python examples/plain_nats_client.py nats://127.0.0.1:4222
"""

import asyncio
import json
import sys
import uuid

import nats
from nats.js.api import DeliverPolicy

TERMINAL = {"rejected", "completed", "failed", "cancelled", "budget_exceeded"}


async def main(url: str) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    task_id = f"example-{uuid.uuid4().hex[:8]}"
    events = await js.subscribe(
        f"agentbus.tasks.events.acme.{task_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    task = {
        "schema_version": 1,
        "task_id": task_id,
        "tenant": "acme",
        "agent": "assistant",
        "input": "What is calculator(19*23)?",
    }
    # Nats-Msg-Id = task_id: publishing the same task again is deduplicated and runs nothing new.
    await js.publish("agentbus.tasks.submit.acme", json.dumps(task).encode(), headers={"Nats-Msg-Id": task_id})
    while True:
        event = json.loads((await events.next_msg(timeout=60)).data)
        print(event["seq"], event["kind"], event.get("output") or event.get("error") or "")
        if event["kind"] in TERMINAL:
            await nc.close()
            return 0 if event["kind"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222")))
