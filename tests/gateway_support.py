"""The gateway under a real `agentbus up` with identities enforced: its URL, each identity's password and
token, and server-sent events read off a real HTTP connection."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cli_support import Suite, prepare_folder, running_suite

IDENTITIES = """\
tenants:
  acme:
    submitters: [acme-app, alice]
    approvers: [alice]
  globex:
    submitters: [globex-app]
    approvers: [bob]
"""
"""alice submits and approves for acme; bob approves for globex alone."""

CONSOLE_LINE = re.compile(r"console and HTTP API at (http://\S+)")
HIGH_TICKET = 'create_ticket(title="primary database down", priority="high")'
TIMEOUT = httpx.Timeout(30.0)


@dataclass
class Gateway:
    suite: Suite
    url: str

    def password(self, user: str) -> str:
        data = json.loads((self.suite.state / "credentials" / f"{user}.json").read_text())
        return str(data["password"])

    def token(self, name: str, user: str) -> str:
        response = httpx.post(f"{self.url}/v1/tokens", auth=(name, self.password(user)), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)


@contextlib.contextmanager
def running_gateway(folder: Path) -> Iterator[Gateway]:
    """`agentbus up` in `folder` with IDENTITIES, once it said where the console is."""
    prepare_folder(folder, identities=IDENTITIES)
    with running_suite(folder) as suite:
        found = [m.group(1) for line in suite.said if (m := CONSOLE_LINE.search(line))]
        assert found, "agentbus up did not print the console's URL:\n" + "".join(suite.said)
        yield Gateway(suite, found[0])


@dataclass
class ServerSentEvent:
    event: str
    data: str
    id: str | None

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


@dataclass
class EventReader:
    """Reads the events of an open text/event-stream response, one at a time."""

    response: httpx.Response
    _lines: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._lines = self.response.iter_lines()

    def next(self) -> ServerSentEvent | None:
        """The next event; None once the server ended the stream."""
        event: str = "message"
        event_id: str | None = None
        data: list[str] = []
        for line in self._lines:
            if line == "":
                if data:
                    return ServerSentEvent(event, "\n".join(data), event_id)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
        return None
