"""Scaling arithmetic on a real nats-server: the lag KEDA reads from /jsz, the replicas it would choose
under the rendered ScaledObject, and `agentbus status` reporting the same numbers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from agentbus.contracts import registry
from agentbus.contracts.llm import ChatMessage, LlmRequest
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.testing import running_nats_server
from deploy.keda import rendered_scaled_objects, scaled_object_replicas
from deploy.manifests import nats_triggers

AGENTBUS = str(Path(sys.executable).parent / "agentbus")
BACKLOG = 77
HELD_UNACKED = 9


def _jsz_lag(monitor_url: str, stream: str, durable: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"{monitor_url}/jsz?acc=$G&consumers=true&config=true", timeout=5) as response:
        jsz: dict[str, Any] = json.load(response)
    for account in jsz["account_details"]:
        for stream_detail in account.get("stream_detail", []):
            if stream_detail["name"] != stream:
                continue
            for consumer in stream_detail.get("consumer_detail", []):
                if consumer["name"] == durable:
                    return consumer["num_pending"], consumer["num_ack_pending"]
    raise AssertionError(f"{stream}/{durable} not in /jsz")


async def test_replicas_follow_the_backlog_and_status_reports_what_keda_reads(tmp_path: Path) -> None:
    consumer = registry.inference_consumer("scripted")
    with running_nats_server(tmp_path / "nats") as server:
        nc = await connect_nats(server.url, "scaling-test")
        js = nc.jetstream()
        await apply_topology(js)
        for n in range(BACKLOG):
            request = LlmRequest(
                request_id=f"backlog.step-{n}", task_id="backlog", tenant="acme", agent="a", model="scripted",
                step=1, messages=[ChatMessage(role="user", content="hi")],
            )  # fmt: skip
            await js.publish(registry.LLM_REQUEST.format(model="scripted"), request.model_dump_json().encode())
        # A worker that took messages and has not acked them yet: they count as ack-pending.
        sub = await js.pull_subscribe_bind(durable=consumer.durable, stream=consumer.stream)
        held = await sub.fetch(HELD_UNACKED, timeout=5)
        assert len(held) == HELD_UNACKED

        pending, ack_pending = _jsz_lag(server.monitor_url, consumer.stream, consumer.durable)
        status = await asyncio.to_thread(
            subprocess.run, [AGENTBUS, "status", "--nats-url", server.url], capture_output=True, text=True, check=True
        )
        await nc.close()

    assert (pending, ack_pending) == (BACKLOG - HELD_UNACKED, HELD_UNACKED)
    row = next(line.split() for line in status.stdout.splitlines() if consumer.durable in line)
    assert [int(v) for v in row[2:5]] == [pending, ack_pending, pending + ack_pending]

    lag = pending + ack_pending
    for overlay in ("dev", "staging", "prod"):
        [scaled] = [
            so
            for so in rendered_scaled_objects(overlay)
            if any(t["metadata"]["consumer"] == consumer.durable for t in nats_triggers(so))
        ]
        trigger = next(t for t in nats_triggers(scaled) if t["metadata"]["consumer"] == consumer.durable)
        threshold = int(trigger["metadata"]["lagThreshold"])
        low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
        expected = min(high, max(low, 1, math.ceil(lag / threshold)))
        assert scaled_object_replicas(scaled, {consumer.durable: lag}) == expected, overlay
        assert scaled_object_replicas(scaled, {}) == low, f"{overlay}: an idle consumer sits at the floor"
