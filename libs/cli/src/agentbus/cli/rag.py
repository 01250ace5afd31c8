"""`agentbus ingest` and `agentbus search`: load a tenant's knowledge base and query it.

`ingest` reads .md and .txt files, checks every one before publishing any (UTF-8, size), publishes
DocumentsIngest batches on the tenant's ingest subject, and then waits until the retriever has handled
each batch: a batch is done when it has left the work-queue stream, and failed when the retriever's
dead-letter subject names its sequence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import nats.errors
from agentbus.cli.config import admin_credential, open_connection, run_nats, submitter_credential
from agentbus.cli.inputs import check_identifier, parse_input
from agentbus.cli.tasks import ANONYMOUS_SUBMITTER
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, MetadataFilter, SearchReply, SearchRequest
from agentbus.contracts.registry import (
    DEAD_LETTER,
    RAG_INGEST,
    RAG_INGEST_DOCUMENTS,
    RAG_SEARCH,
    RETRIEVER_INGEST,
    Header,
)
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

DOCUMENT_SUFFIXES = (".md", ".txt")
DEFAULT_MAX_DOCUMENT_BYTES = 1_000_000
"""The retriever's default limit (AGENTBUS_RETRIEVER_MAX_DOCUMENT_BYTES)."""
BATCH_BYTES = 512 * 1024
BATCH_DOCUMENTS = 16
EXIT_FAILED = 1
EXIT_TIMEOUT = 3


@dataclass(frozen=True)
class SourceFile:
    path: Path
    document_id: str


def _source_files(paths: tuple[Path, ...]) -> list[SourceFile]:
    files: dict[str, SourceFile] = {}
    for given in paths:
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES):
                document_id = path.relative_to(given).as_posix()
                files[document_id] = SourceFile(path, document_id)
        elif given.is_file():
            if given.suffix.lower() not in DOCUMENT_SUFFIXES:
                raise click.BadParameter(
                    f"{given}: only {' and '.join(DOCUMENT_SUFFIXES)} files are ingested", param_hint="PATHS"
                )
            files[given.name] = SourceFile(given, given.name)
        else:
            raise click.BadParameter(f"{given}: no such file or folder", param_hint="PATH")
    return list(files.values())


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        stripped = line.strip().lstrip("#").strip()
        if stripped:
            return stripped[:200]
    return fallback


def read_documents(
    paths: tuple[Path, ...], max_document_bytes: int, extra_metadata: dict[str, Any] | None = None
) -> list[IngestDocument]:
    """Every .md/.txt file under `paths` as a document (id: the path relative to the folder given).

    Raises click.ClickException naming every bad file (not UTF-8, too large, empty) so that nothing is
    published when any file is bad.
    """
    problems, documents = [], []
    for source in _source_files(paths):
        data = source.path.read_bytes()
        if len(data) > max_document_bytes:
            problems.append(f"{source.path}: {len(data)} bytes, over the limit of {max_document_bytes}")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{source.path}: not UTF-8 text (byte {exc.start})")
            continue
        if not text.strip():
            problems.append(f"{source.path}: empty")
            continue
        metadata: dict[str, Any] = {
            **(extra_metadata or {}),
            "source": source.document_id,
            "title": _title(text, source.path.stem),
            "format": source.path.suffix[1:],
        }
        documents.append(IngestDocument(id=source.document_id, text=text, metadata=metadata))
    if problems:
        raise click.ClickException("nothing was ingested; fix these files first:\n  " + "\n  ".join(problems))
    if not documents:
        raise click.ClickException(f"no {'/'.join(DOCUMENT_SUFFIXES)} files found")
    return documents


def batches(tenant: str, documents: list[IngestDocument]) -> Iterator[DocumentsIngest]:
    """DocumentsIngest messages of at most BATCH_DOCUMENTS documents and about BATCH_BYTES of text."""
    batch: list[IngestDocument] = []
    size = 0
    for document in documents:
        length = len(document.text.encode())
        if batch and (len(batch) >= BATCH_DOCUMENTS or size + length > BATCH_BYTES):
            yield DocumentsIngest(tenant=tenant, documents=batch)
            batch, size = [], 0
        batch.append(document)
        size += length
    if batch:
        yield DocumentsIngest(tenant=tenant, documents=batch)


async def _ingest(
    nc: NatsClient,
    operator: NatsClient,
    tenant: str,
    submitter: str,
    messages: list[DocumentsIngest],
    wait: bool,
    timeout: float,
) -> list[str] | None:
    """Publish every batch as `submitter` (on `nc`); with `wait`, watch as the operator whether the retriever
    handled each batch, and return the failed batches' reasons, or None on timeout."""
    js = nc.jetstream()
    watch = operator.jetstream()
    dead_letters = await watch.subscribe(
        DEAD_LETTER.format(stream=RETRIEVER_INGEST.stream, consumer=RETRIEVER_INGEST.durable),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    failures: dict[int, str] = {}

    async def collect_dead_letters(wait_seconds: float) -> None:
        while True:
            try:
                letter = DeadLetter.model_validate_json((await dead_letters.next_msg(timeout=wait_seconds)).data)
            except nats.errors.TimeoutError:
                return
            if (message := published.get(letter.stream_seq)) is not None:
                ids = ", ".join(d.id for d in message.documents)
                failures[letter.stream_seq] = f"[{ids}] {letter.error.code}: {letter.error.message}"

    try:
        published: dict[int, DocumentsIngest] = {}
        with click.progressbar(length=len(messages), label="publishing", file=sys.stderr) as bar:
            for message in messages:
                body = message.model_dump_json().encode()
                # The same batch published twice within the stream's duplicate window is stored once.
                msg_id = f"ingest:{tenant}:{hashlib.sha256(body).hexdigest()[:32]}"
                ack = await js.publish(
                    RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter=submitter),
                    body,
                    headers={Header.MSG_ID: msg_id},
                )
                published[ack.seq] = message
                bar.update(1)
        if not wait:
            return None
        remaining = set(published)
        with click.progressbar(length=len(remaining), label="indexing  ", file=sys.stderr) as bar:
            try:
                async with asyncio.timeout(timeout):
                    while remaining:
                        for seq in sorted(remaining):
                            try:
                                await watch.get_msg(RAG_INGEST.name, seq)
                            except NotFoundError:  # handled and acked: it left the work queue
                                remaining.discard(seq)
                                bar.update(1)
                        await collect_dead_letters(0.2)
            except TimeoutError:
                return None
        # A dead letter is stored before its message is acked; give its delivery a moment.
        await collect_dead_letters(0.5)
        return [failures[seq] for seq in sorted(failures)]
    finally:
        await dead_letters.unsubscribe()


@click.command("ingest")
@click.argument("tenant")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the retriever has indexed it all.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for indexing.")
@click.option("--max-document-bytes", type=int, default=DEFAULT_MAX_DOCUMENT_BYTES, show_default=True)
@click.option(
    "--metadata",
    "metadata_pairs",
    multiple=True,
    help="KEY=VALUE added to every document's metadata (VALUE is JSON when it parses). Repeatable.",
)
@click.option("--as", "submitter", default=None, help="Ingest as this submitter of the tenant. Default: its first.")
@click.option(
    "--nats-url", default=None, help="NATS URL. Default: $AGENTBUS_NATS_URL, then ./.agentbus/env, then :4222."
)
def ingest_command(
    tenant: str,
    paths: tuple[Path, ...],
    wait: bool,
    timeout: float,
    max_document_bytes: int,
    metadata_pairs: tuple[str, ...],
    submitter: str | None,
    nats_url: str | None,
) -> None:
    """Index the .md and .txt files in PATHS (files or folders) into TENANT's knowledge base.

    A document's id is its path relative to the folder given, so ingesting a folder again replaces
    its documents. Every file is checked first: if any is not UTF-8, too large or empty, nothing is sent.
    Documents are published as a submitter of the tenant (its first unless --as names one), like tasks.
    """
    check_identifier("TENANT", tenant)
    credential, submitter = submitter_credential(tenant, submitter)
    token = submitter or ANONYMOUS_SUBMITTER
    documents = read_documents(paths, max_document_bytes, _metadata(metadata_pairs))
    messages = list(batches(tenant, documents))

    async def action(nc: NatsClient) -> list[str] | None:
        # Whether the retriever handled each batch is watched as the operator: a submitter may not read streams.
        operator = await open_connection(nats_url, admin_credential()) if wait else nc
        try:
            return await _ingest(nc, operator, tenant, token, messages, wait, timeout)
        finally:
            if operator is not nc:
                await operator.close()

    outcome = run_nats(nats_url, credential, action)
    if not wait:
        click.echo(f"queued {len(documents)} documents in {len(messages)} batches for tenant {tenant}")
        return
    if outcome is None:
        click.echo(
            f"queued {len(documents)} documents, but not all were indexed within {timeout:.0f}s "
            "(is the retriever running? `agentbus status` shows the retriever-ingest backlog)",
            err=True,
        )
        sys.exit(EXIT_TIMEOUT)
    for failure in outcome:
        click.echo(f"failed: {failure}", err=True)
    if outcome:
        sys.exit(EXIT_FAILED)
    click.echo(f"indexed {len(documents)} documents in {len(messages)} batches for tenant {tenant}")


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _metadata(pairs: tuple[str, ...]) -> dict[str, Any]:
    metadata = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--metadata")
        metadata[key.strip()] = _json_or_text(raw)
    return metadata


def _parse_filter(expression: str) -> MetadataFilter:
    for symbol, op in (("!=", "ne"), (">=", "gte"), ("<=", "lte"), ("=", "eq"), (">", "gt"), ("<", "lt")):
        field, sep, raw = expression.partition(symbol)
        if sep:
            value = _json_or_text(raw)
            if op == "eq" and isinstance(value, list):
                op = "in"
            try:
                return MetadataFilter(field=field.strip(), op=op, value=value)  # type: ignore[arg-type]
            except ValidationError as exc:
                first = exc.errors()[0]
                problem = (
                    "FIELD is a letter or '_' and then up to 63 letters, digits or '_'"
                    if first["type"] == "string_pattern_mismatch"
                    else first["msg"]
                )
                raise click.BadParameter(f"{expression!r}: {problem}", param_hint="--filter") from exc
    raise click.BadParameter(f"{expression!r}: expected FIELD=VALUE (or !=, >, >=, <, <=)", param_hint="--filter")


@click.command("search")
@click.argument("tenant")
@click.argument("query")
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--mode", type=click.Choice(["hybrid", "dense", "bm25"]), default="hybrid", show_default=True)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    help="Metadata condition FIELD=VALUE (also !=, >, >=, <, <=); VALUE is JSON when it parses, e.g. year>=2024 "
    'or kind=["faq","guide"]. Repeat for AND.',
)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.option(
    "--nats-url", default=None, help="NATS URL. Default: $AGENTBUS_NATS_URL, then ./.agentbus/env, then :4222."
)
def search_command(
    tenant: str,
    query: str,
    top_k: int,
    mode: str,
    filters: tuple[str, ...],
    timeout: float,
    as_json: bool,
    nats_url: str | None,
) -> None:
    """Search TENANT's knowledge base for QUERY; print the best chunks with their source and score."""
    check_identifier("TENANT", tenant)
    request = parse_input(
        SearchRequest,
        tenant=tenant,
        query=query,
        top_k=top_k,
        mode=mode,
        filters=[_parse_filter(f) for f in filters],
    )

    async def action(nc: NatsClient) -> SearchReply:
        try:
            msg = await nc.request(
                RAG_SEARCH.format(tenant=tenant), request.model_dump_json().encode(), timeout=timeout
            )
        except nats.errors.NoRespondersError as exc:
            raise click.ClickException("no retriever is running to answer searches") from exc
        except nats.errors.TimeoutError as exc:
            raise click.ClickException(f"the retriever did not answer within {timeout:g}s") from exc
        try:
            return SearchReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise click.ClickException(f"unreadable reply from the retriever: {exc.errors()[0]['msg']}") from exc

    reply = run_nats(nats_url, submitter_credential(tenant, None)[0], action)
    if as_json:
        click.echo(reply.model_dump_json())
    if reply.error is not None:
        raise click.ClickException(f"{reply.error.code}: {reply.error.message}")
    if as_json:
        return
    if not reply.chunks:
        click.echo("no matching chunks")
    for rank, chunk in enumerate(reply.chunks, 1):
        title = chunk.metadata.get("title")
        click.echo(
            f"{rank:>2}. {chunk.document_id}#{chunk.chunk_index}  score={chunk.score:.4f}"
            + (f"  {title}" if title else "")
        )
        snippet = " ".join(chunk.text.split())
        click.echo(f"    {snippet[:300]}{'…' if len(snippet) > 300 else ''}")
