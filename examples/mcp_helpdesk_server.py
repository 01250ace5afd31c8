"""A small helpdesk MCP server: open, read and close tickets kept in one JSON file.

It uses nothing from agentbus, only the official `mcp` SDK, and serves either transport:

    python examples/mcp_helpdesk_server.py                                  # stdio (as tools/helpdesk.yaml runs it)
    python examples/mcp_helpdesk_server.py --transport streamable-http --port 8765   # http://127.0.0.1:8765/mcp

The tickets file is $HELPDESK_DATA, else --data, else `helpdesk-tickets.json` in the working folder (the
executor runs a stdio server in a fresh temporary folder, so there the tickets last as long as the server).
`open_ticket` appends a ticket, so running it twice opens two: it is not idempotent. `close_ticket` is
destructive, and tools/helpdesk.yaml has every call of it wait for an approver.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("helpdesk", instructions="Open, read and close helpdesk tickets.")
DATA = Path(os.environ.get("HELPDESK_DATA", "helpdesk-tickets.json"))


def _load() -> list[dict[str, Any]]:
    if not DATA.exists():
        return []
    tickets: list[dict[str, Any]] = json.loads(DATA.read_text(encoding="utf-8"))
    return tickets


def _save(tickets: list[dict[str, Any]]) -> None:
    staged = DATA.with_suffix(".tmp")
    staged.write_text(json.dumps(tickets, indent=2), encoding="utf-8")
    staged.replace(DATA)


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False))
def open_ticket(title: str, priority: Literal["low", "medium", "high"] = "medium", body: str = "") -> str:
    """Open a helpdesk ticket and return its id. Every call opens a new ticket."""
    tickets = _load()
    ticket = {"id": f"HD-{len(tickets) + 1}", "title": title, "priority": priority, "body": body, "status": "open"}
    _save([*tickets, ticket])
    return f"opened {ticket['id']}: {title} ({priority})"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def get_ticket(ticket_id: str) -> dict[str, Any]:
    """Read one ticket: its title, priority, body and status."""
    for ticket in _load():
        if ticket["id"] == ticket_id:
            return ticket
    raise ValueError(f"no ticket {ticket_id}")


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True))
def close_ticket(ticket_id: str, resolution: str) -> str:
    """Close a ticket with a resolution. Closed tickets cannot be reopened."""
    tickets = _load()
    for ticket in tickets:
        if ticket["id"] == ticket_id:
            ticket.update(status="closed", resolution=resolution)
            _save(tickets)
            return f"closed {ticket_id}: {resolution}"
    raise ValueError(f"no ticket {ticket_id}")


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", type=Path, default=None)
    arguments = parser.parse_args()
    if arguments.data is not None and "HELPDESK_DATA" not in os.environ:
        DATA = arguments.data
    if arguments.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=arguments.port)


if __name__ == "__main__":
    main()
