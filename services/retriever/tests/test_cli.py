"""`agentbus ingest` and `agentbus search` against the real retriever, invoked through click's CliRunner."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from agentbus.cli.rag import ingest_command, search_command
from agentbus.retriever.app import RetrieverApp
from agentbus.runtime.server import NatsServerProcess
from click.testing import CliRunner, Result

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "corpus" / "support"


async def invoke(command: object, args: list[str]) -> Result:
    # Each command runs its own event loop (asyncio.run): give it a thread, the retriever keeps this loop.
    return await asyncio.to_thread(CliRunner().invoke, command, args)  # type: ignore[arg-type]


async def test_ingest_a_folder_then_search_it(retriever: RetrieverApp, bootstrapped_nats: NatsServerProcess) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    url = ["--nats-url", bootstrapped_nats.url]
    result = await invoke(ingest_command, [tenant, str(CORPUS), "--metadata", "product=driftbox", *url])
    assert result.exit_code == 0, result.output
    assert f"indexed 8 documents in 1 batches for tenant {tenant}" in result.output

    result = await invoke(search_command, [tenant, "my files stopped syncing", *url])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(" 1. sync-stopped.md#")

    result = await invoke(search_command, [tenant, "can I get my money back", "--json", "--top-k", "2", *url])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert reply["chunks"][0]["document_id"] == "billing-refunds.md"
    assert reply["chunks"][0]["metadata"]["product"] == "driftbox"
    assert reply["chunks"][0]["metadata"]["title"] == "Refunds and cancellations"
    assert len(reply["chunks"]) == 2

    result = await invoke(search_command, [tenant, "refund", "--filter", "product=other", *url])
    assert result.exit_code == 0, result.output
    assert "no matching chunks" in result.output

    result = await invoke(search_command, [tenant, "   ", *url])
    assert result.exit_code == 1
    assert "empty_query" in result.output


async def test_a_bad_file_stops_the_whole_ingest_before_anything_is_sent(
    retriever: RetrieverApp, bootstrapped_nats: NatsServerProcess, tmp_path: Path
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    url = ["--nats-url", bootstrapped_nats.url]
    (tmp_path / "good.md").write_text("# Good\nA fine document.", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = await invoke(ingest_command, [tenant, str(tmp_path), *url])
    assert result.exit_code == 1
    assert "latin1.txt: not UTF-8" in result.output
    assert "nothing was ingested" in result.output

    result = await invoke(search_command, [tenant, "fine document", *url])
    assert result.exit_code == 1
    assert "unknown_tenant" in result.output


async def test_a_batch_the_retriever_refuses_is_reported(
    retriever: RetrieverApp, bootstrapped_nats: NatsServerProcess, tmp_path: Path
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    too_big = retriever.retriever_settings.max_document_bytes + 1
    (tmp_path / "big.txt").write_text("word " * (too_big // 5 + 1), encoding="utf-8")
    args = [tenant, str(tmp_path / "big.txt"), "--max-document-bytes", str(10 * too_big)]
    result = await invoke(ingest_command, [*args, "--nats-url", bootstrapped_nats.url])
    assert result.exit_code == 1, result.output
    assert "failed: [big.txt] document_too_large" in result.output
