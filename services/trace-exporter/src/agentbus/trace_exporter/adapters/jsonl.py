"""A TraceSink that appends spans to a local JSONL file: the default when no trace backend is configured."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

from agentbus.trace_exporter.domain import ExportSpan
from agentbus.trace_exporter.ports import BackendUnavailable


class JsonlTraceSink:
    """One JSON object per span per line, appended and fsynced per batch (in a worker thread)."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def export(self, spans: Sequence[ExportSpan]) -> None:
        lines = "".join(json.dumps(span.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n" for span in spans)
        try:
            await asyncio.to_thread(self._append, lines)
        except OSError as exc:
            # A full or read-only disk is an outage like any other: spans wait in JetStream.
            raise BackendUnavailable(f"cannot append to {self.path}: {exc}") from exc

    def _append(self, lines: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            size = file.tell()
            try:
                file.write(lines)
                file.flush()
                os.fsync(file.fileno())
            except OSError:
                # No half batch left behind: the whole batch is written again on the retry.
                file.truncate(size)
                raise

    async def close(self) -> None:
        """Nothing stays open between batches."""
