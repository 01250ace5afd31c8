"""What the MCP tests share: the test server (mcp_test_server.py) over stdio or streamable HTTP, its tool
server file for the executor, and a way to start, kill and restart the HTTP server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from agentbus.runtime.server import free_port

SERVER_SCRIPT = Path(__file__).resolve().parent / "mcp_test_server.py"
SERVER = "testsrv"

_STRING = {"type": "string"}
_RECORD = {
    "type": "object",
    "properties": {"path": _STRING, "key": _STRING, "sleep": {"type": "number", "minimum": 0}},
    "required": ["path", "key"],
}
PINNED: dict[str, dict[str, Any]] = {
    "echo": {
        "description": "Say the text back.",
        "parameters": {"type": "object", "properties": {"text": _STRING}, "required": ["text"]},
        "annotations": {"readOnlyHint": True},
        "idempotent": True,
    },
    "record": {
        "description": "Append a line to a file, then wait: not safe to run twice.",
        "parameters": _RECORD,
        "approval": {
            "policy": "rules",
            "rules": [{"when": 'key matches "^ask"', "reason": "keys starting with ask need a person"}],
            "approvers": {"*": ["group:ops-leads"]},
        },
    },
    "record_again": {
        "description": "Append a line to a file, then wait (its file declares it idempotent).",
        "parameters": _RECORD,
        "idempotent": True,
    },
    "huge": {
        "description": "Answer with size characters.",
        "parameters": {"type": "object", "properties": {"size": {"type": "integer"}}, "required": ["size"]},
    },
    "garbled": {"description": "A malformed answer.", "parameters": {"type": "object"}},
    "misshapen": {"description": "An answer that is not a tool result.", "parameters": {"type": "object"}},
    "fail": {
        "description": "Fail with the message.",
        "parameters": {"type": "object", "properties": {"message": _STRING}, "required": ["message"]},
    },
    "enroll": {"description": "Add late_tool.", "parameters": {"type": "object"}},
    "retire": {
        "description": "Remove a tool.",
        "parameters": {"type": "object", "properties": {"name": _STRING}, "required": ["name"]},
    },
    "late_tool": {
        "description": "A tool that exists only once enroll ran.",
        "parameters": {"type": "object", "properties": {"text": _STRING}, "required": ["text"]},
    },
}


def server_file(folder: Path, transport: dict[str, Any], **settings: Any) -> Path:
    """Write the test server's file into a tools folder; the folder is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "name": SERVER,
        "kind": "mcp",
        "transport": transport,
        "connect_timeout_seconds": 15,
        "timeout_seconds": 20,
        "defaults": {"approval": {"policy": "never"}},
        "tools": PINNED,
        **settings,
    }
    (folder / f"{SERVER}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


def stdio_transport() -> dict[str, Any]:
    return {"type": "stdio", "command": "{python}", "args": [str(SERVER_SCRIPT)]}


def http_transport(port: int) -> dict[str, Any]:
    return {"type": "streamable-http", "url": f"http://127.0.0.1:{port}/mcp"}


class HttpServer:
    """The test server over streamable HTTP, in a process of its own on a fixed port: killed and started again
    as a test needs."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER_SCRIPT), "--transport", "streamable-http", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            assert self.process.poll() is None, self._log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"the HTTP test server did not listen on {self.port}:\n{self._log.read_text()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def records(path: Path, key: str) -> list[int]:
    """The pids of the server processes that ran the call recording `key`, one per run."""
    if not path.exists():
        return []
    return [int(pid) for line in path.read_text().splitlines() for found, pid in [line.split()] if found == key]
