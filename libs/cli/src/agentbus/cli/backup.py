"""`agentbus backup DIR` and `agentbus restore DIR`: everything a deployment needs to come back.

A backup holds, with a manifest of sizes and SHA-256 checksums:

- every JetStream stream and KV bucket, taken with the server's own snapshot API (messages, sequence numbers,
  timestamps, message schedules and every durable consumer's position: a restored consumer resumes where
  the backed-up one was);
- the SQLite databases of the state directory (the tool-executor's approvals and execution ledger, the
  cost-accountant's ledger and reservations, the trace-exporter's exported-span ledger), copied with
  SQLite's online backup API, so a running service never leaves a torn copy;
- the retriever's Milvus Lite file and the trace JSONL, copied as files;
- the identities and the NATS credentials (kept readable by their owner only).

Order: the streams first, the databases after. A database is then never older than the messages it
consumed, so after a restore the messages consumed in between are delivered again, and every handler,
idempotent on the ids in its messages, finds their effects already recorded: nothing is done twice and no
cost is lost. PostgreSQL databases (production) are backed up with PostgreSQL's own tools; the manifest
names the ones the state directory does not hold.

`restore` checks every checksum first, then brings a fresh state directory back (a nats-server of its own
is started on it to restore the streams into), or restores the streams into a running server or cluster
given with --nats-url whose streams do not exist yet. `agentbus up` then resumes where the backup was.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from agentbus.cli.config import STATE_DIR, admin_credential, resolve_nats_url, run_nats
from agentbus.cli.identities import (
    ADMIN_USER,
    CREDENTIALS_DIR_NAME,
    IDENTITIES_FILE_NAME,
    CredentialStore,
    load_or_create_identities,
)
from agentbus.cli.permissions import nats_users
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerError, NatsServerProcess, free_port
from nats.aio.client import Client as NatsClient

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 128 * 1024
SQLITE_FILES = ("tool-executor.db", "cost-accountant.db", "trace-exporter-ledger.sqlite3")
"""The SQLite stores `agentbus up` keeps in its state directory (see `implemented_services`)."""
PLAIN_FILES = ("milvus.db", "traces.jsonl")
API_TIMEOUT_SECONDS = 30.0


class BackupError(click.ClickException):
    """A backup or restore that cannot go on: one line, exit 1."""


@dataclass(frozen=True)
class StreamSnapshot:
    name: str
    file: str
    sha256: str
    bytes: int
    messages: int
    config: dict[str, Any]
    state: dict[str, Any]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _api_reply(data: bytes, what: str) -> dict[str, Any]:
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise BackupError(f"{what}: the server answered something that is not JSON") from exc
    error = reply.get("error")
    if error:
        raise BackupError(f"{what}: {error.get('description', error)} (code {error.get('err_code', '?')})")
    return reply


async def stream_names(nc: NatsClient) -> list[str]:
    """Every stream of the account (KV buckets included), by name."""
    names: list[str] = []
    offset = 0
    while True:
        message = await nc.request(
            "$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode(), timeout=API_TIMEOUT_SECONDS
        )
        reply = _api_reply(message.data, "listing streams")
        page = reply.get("streams") or []
        names += page
        offset += len(page)
        if not page or offset >= int(reply.get("total", 0)):
            return sorted(names)


async def snapshot_stream(nc: NatsClient, name: str, target: Path) -> StreamSnapshot:
    """Write the server's snapshot of stream `name` (with its consumers) to `target`."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        request = {"deliver_subject": inbox, "chunk_size": CHUNK_BYTES, "jsck": True}
        message = await nc.request(
            f"$JS.API.STREAM.SNAPSHOT.{name}", json.dumps(request).encode(), timeout=API_TIMEOUT_SECONDS
        )
        reply = _api_reply(message.data, f"snapshot of {name}")
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:  # noqa: ASYNC230 - one local file, written chunk by chunk as it arrives
            while True:
                chunk = await subscription.next_msg(timeout=API_TIMEOUT_SECONDS)
                if not chunk.data:
                    status = (chunk.headers or {}).get("Status")
                    if status not in (None, "204"):
                        description = (chunk.headers or {}).get("Description", "")
                        raise BackupError(f"snapshot of {name} ended with status {status} {description}".strip())
                    break
                out.write(chunk.data)
                digest.update(chunk.data)
                size += len(chunk.data)
                if chunk.reply:
                    # The server sends past its window only once chunks are acknowledged.
                    await nc.publish(chunk.reply, b"")
            out.flush()
            os.fsync(out.fileno())
    finally:
        await subscription.unsubscribe()
    state = reply.get("state") or {}
    return StreamSnapshot(
        name=name,
        file=f"jetstream/{target.name}",
        sha256=digest.hexdigest(),
        bytes=size,
        messages=int(state.get("messages", 0)),
        config=reply.get("config") or {},
        state=state,
    )


async def restore_stream(nc: NatsClient, snapshot: StreamSnapshot, source: Path) -> int:
    """Restore one stream from its snapshot file; the number of messages it holds afterwards."""
    request = {"config": snapshot.config, "state": snapshot.state}
    message = await nc.request(
        f"$JS.API.STREAM.RESTORE.{snapshot.name}", json.dumps(request).encode(), timeout=API_TIMEOUT_SECONDS
    )
    deliver = _api_reply(message.data, f"restore of {snapshot.name}").get("deliver_subject")
    if not deliver:
        raise BackupError(f"restore of {snapshot.name}: the server gave no subject to send the snapshot to")
    with source.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            ack = await nc.request(deliver, chunk, timeout=API_TIMEOUT_SECONDS)
            if ack.data:
                _api_reply(ack.data, f"restore of {snapshot.name}")
    done = await nc.request(deliver, b"", timeout=120.0)
    info = _api_reply(done.data, f"restore of {snapshot.name}")
    return int((info.get("state") or {}).get("messages", 0))


def _copy_sqlite(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy even while a service writes the database."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    # sqlite3's context manager commits but does not close.
    sqlite3.connect(target).close()


def _copy_private_tree(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)
            (target / path.name).chmod(0o600)


def _entry(root: Path, path: Path, kind: str) -> dict[str, Any]:
    return {"path": str(path.relative_to(root)), "kind": kind, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def _walk_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


async def snapshot_streams(nc: NatsClient, target: Path) -> list[StreamSnapshot]:
    """The server's snapshot of every stream (KV buckets included) into `target`/jetstream/."""
    folder = target / "jetstream"
    return [await snapshot_stream(nc, name, folder / f"{name}.snapshot") for name in await stream_names(nc)]


def copy_state_files(state_dir: Path, target: Path) -> list[dict[str, Any]]:
    """The state directory's databases (online SQLite backups), files, identities and credentials."""
    files: list[dict[str, Any]] = []
    if not state_dir.is_dir():
        return files
    (target / "sql").mkdir()
    for name in SQLITE_FILES:
        if (state_dir / name).is_file():
            _copy_sqlite(state_dir / name, target / "sql" / name)
            files.append(_entry(target, target / "sql" / name, "sqlite"))
    (target / "files").mkdir()
    for name in PLAIN_FILES:
        if (state_dir / name).is_dir():
            shutil.copytree(state_dir / name, target / "files" / name)
            files += [_entry(target, path, "file") for path in _walk_files(target / "files" / name)]
        elif (state_dir / name).is_file():
            shutil.copy2(state_dir / name, target / "files" / name)
            files.append(_entry(target, target / "files" / name, "file"))
    if (state_dir / IDENTITIES_FILE_NAME).is_file():
        shutil.copy2(state_dir / IDENTITIES_FILE_NAME, target / IDENTITIES_FILE_NAME)
        files.append(_entry(target, target / IDENTITIES_FILE_NAME, "identities"))
    if (state_dir / CREDENTIALS_DIR_NAME).is_dir():
        _copy_private_tree(state_dir / CREDENTIALS_DIR_NAME, target / CREDENTIALS_DIR_NAME)
        files += [_entry(target, path, "credentials") for path in _walk_files(target / CREDENTIALS_DIR_NAME)]
    return files


def write_manifest(target: Path, source: str, streams: list[StreamSnapshot], files: list[dict[str, Any]]) -> None:
    manifest = {
        "version": MANIFEST_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "source": source,
        "order": "streams first, then databases (a database is never older than what it consumed)",
        "streams": [snapshot.__dict__ for snapshot in streams],
        "files": files,
        "not_included": "PostgreSQL databases (back them up with pg_dump or point-in-time recovery)",
    }
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(backup: Path) -> dict[str, Any]:
    """The manifest of a backup, every checksum verified. Raises BackupError on the first mismatch."""
    try:
        manifest: dict[str, Any] = json.loads((backup / MANIFEST_NAME).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BackupError(f"{backup}: no readable {MANIFEST_NAME}: is this a backup folder?") from exc
    except ValueError as exc:
        raise BackupError(f"{backup / MANIFEST_NAME}: not valid JSON") from exc
    if manifest.get("version") != MANIFEST_VERSION:
        raise BackupError(f"{backup / MANIFEST_NAME}: version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    entries = [(s["file"], s["sha256"]) for s in manifest["streams"]] + [
        (f["path"], f["sha256"]) for f in manifest["files"]
    ]
    for relative, expected in entries:
        path = backup / relative
        if not path.is_file():
            raise BackupError(f"{path}: missing from the backup")
        if sha256_of(path) != expected:
            raise BackupError(f"{path}: checksum differs from the manifest (the backup is damaged)")
    return manifest


async def restore_streams(nc: NatsClient, backup: Path, manifest: dict[str, Any]) -> list[tuple[str, int]]:
    existing = set(await stream_names(nc))
    snapshots = [StreamSnapshot(**s) for s in manifest["streams"]]
    clash = sorted(existing & {s.name for s in snapshots})
    if clash:
        raise BackupError(
            f"stream {clash[0]} already exists on the server: restore needs a server without these streams"
        )
    return [(s.name, await restore_stream(nc, s, backup / s.file)) for s in snapshots]


def restore_files(backup: Path, manifest: dict[str, Any], state_dir: Path) -> None:
    """Put the databases and files of the backup into `state_dir`."""
    for entry in manifest["files"]:
        relative = Path(entry["path"])
        if entry["kind"] in ("identities", "credentials"):
            continue  # put in place before the server starts
        top = relative.parts[0]
        target = state_dir / Path(*relative.parts[1:]) if top in ("sql", "files") else state_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(backup / relative, target)


def restore_identities(backup: Path, state_dir: Path) -> None:
    if (backup / IDENTITIES_FILE_NAME).is_file():
        shutil.copy2(backup / IDENTITIES_FILE_NAME, state_dir / IDENTITIES_FILE_NAME)
    if (backup / CREDENTIALS_DIR_NAME).is_dir():
        _copy_private_tree(backup / CREDENTIALS_DIR_NAME, state_dir / CREDENTIALS_DIR_NAME)


async def _restore_into_own_server(backup: Path, manifest: dict[str, Any], state_dir: Path) -> list[tuple[str, int]]:
    """Start a nats-server on the state directory (the identities of the backup enforced), restore, stop."""
    credentials = CredentialStore(state_dir / CREDENTIALS_DIR_NAME)
    users = nats_users(load_or_create_identities(state_dir / IDENTITIES_FILE_NAME), credentials)
    server = NatsServerProcess(
        store_dir=state_dir / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_file=state_dir / "logs" / "nats-server.log",
        users=users,
    )
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    except NatsServerError as exc:
        raise BackupError(f"cannot start nats-server on {state_dir}: {exc}") from exc
    try:
        admin = credentials.ensure(ADMIN_USER)
        nc = await connect_nats(server.url, "agentbus-restore", user=admin.user, password=admin.password)
        try:
            return await restore_streams(nc, backup, manifest)
        finally:
            await nc.close()
    finally:
        server.stop()


@click.command("backup")
@click.argument("target", type=click.Path(path_type=Path, file_okay=False))
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=STATE_DIR, show_default=True)
@click.option("--nats-url", default=None, help="The server or cluster to back up (default: the state directory's).")
def backup(target: Path, state_dir: Path, nats_url: str | None) -> None:
    """Back up every stream and KV bucket (server snapshots), the state directory's databases, files,
    identities and credentials into TARGET, with a manifest of checksums."""
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target}: exists and is not empty; back up into a new folder")
    (target / "jetstream").mkdir(parents=True, exist_ok=True)
    url = resolve_nats_url(nats_url, state_dir)

    async def action(nc: NatsClient) -> list[StreamSnapshot]:
        return await snapshot_streams(nc, target)

    # Streams first, then the databases: see the module's docstring.
    streams = run_nats(url, admin_credential(state_dir), action)
    files = copy_state_files(state_dir, target)
    write_manifest(target, url, streams, files)
    messages = sum(snapshot.messages for snapshot in streams)
    click.echo(f"backed up {len(streams)} streams ({messages} messages) and {len(files)} files into {target}")


@click.command("restore")
@click.argument("source", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=STATE_DIR, show_default=True)
@click.option(
    "--nats-url",
    default=None,
    help="Restore the streams into this running server or cluster instead of the state directory's own.",
)
def restore(source: Path, state_dir: Path, nats_url: str | None) -> None:
    """Bring a backup back: checksums first, then the streams, databases, files, identities and credentials.
    Then `agentbus up --state-dir ...` resumes where the backup was."""
    manifest = read_manifest(source)
    if nats_url is None and (state_dir / "nats").exists():
        raise BackupError(f"{state_dir}: already holds a nats-server store; restore into a fresh state directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    restore_identities(source, state_dir)
    if nats_url is None:
        restored = asyncio.run(_restore_into_own_server(source, manifest, state_dir))
    else:

        async def action(nc: NatsClient) -> list[tuple[str, int]]:
            return await restore_streams(nc, source, manifest)

        restored = run_nats(nats_url, admin_credential(state_dir), action)
    restore_files(source, manifest, state_dir)
    messages = sum(count for _, count in restored)
    click.echo(
        f"restored {len(restored)} streams ({messages} messages) and {len(manifest['files'])} files into {state_dir}"
    )
