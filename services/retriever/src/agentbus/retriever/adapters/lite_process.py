"""A Milvus Lite file served over gRPC by a child process, and that child's entry point.

Milvus Lite 3 is a pure-Python engine that pymilvus normally starts inside the caller's process: every
search then runs Python in the service's own interpreter, contending with the event loop, NATS and the
embedder for one lock. Served from a child process it has an interpreter (and a core) of its own, and the
retriever reaches it exactly as it reaches a Milvus server: pymilvus over gRPC to a URI.

The child prints the port it listens on, then serves until its standard input closes, so it ends with its
parent even when the parent is killed (the file's lock is released with it).

    python -m agentbus.retriever.adapters.lite_process <data path>
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

READY_PREFIX = "milvus-lite-port "
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0
SERVER_THREADS = 16
"""gRPC worker threads in the child: one per search in flight, so searches wait in Lite, not in a queue."""


class LiteServerError(RuntimeError):
    """The child process did not start serving the file."""


class LiteServer:
    """The parent's handle on the child: `start()` returns the URI to connect to, `stop()` ends it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> str:
        process = self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, os.fspath(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Its own session: a Ctrl-C or SIGTERM sent to the retriever's process group must not stop the
            # engine while the retriever still drains searches; the child ends when its input closes.
            start_new_session=True,
        )
        assert process.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline() if process.stdout else ""))
        reader.start()
        reader.join(START_TIMEOUT_SECONDS)
        if not line or not line[0].startswith(READY_PREFIX):
            self.stop()
            raise LiteServerError(f"Milvus Lite did not start serving {self.path} (exit code {process.poll()})")
        return f"http://127.0.0.1:{int(line[0][len(READY_PREFIX) :])}"

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def serve(path: str) -> None:
    """Serve the Lite file at `path` on a free local port until standard input closes."""
    from agentbus.retriever.adapters import lite_bm25
    from milvus_lite.adapter.grpc.server import start_server_in_thread  # type: ignore[import-untyped]

    lite_bm25.install()  # BM25 scored with numpy, not a Python loop per posting (see the module)
    server, db, port = start_server_in_thread(path, host="127.0.0.1", port=0, max_workers=SERVER_THREADS)
    print(f"{READY_PREFIX}{port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop(grace=5).wait()
        db.close()


if __name__ == "__main__":
    serve(sys.argv[1])
