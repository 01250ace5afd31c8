"""`python -m agentbus.gateway`: serve the console and the HTTP API until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from types import FrameType

import uvicorn
from agentbus.contracts.registry import Service
from agentbus.gateway.app import create_app
from agentbus.gateway.settings import GatewaySettings
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.logging import configure_logging
from pydantic import ValidationError

STREAMS_CLOSE_SECONDS = 3
"""On SIGTERM, open event streams get this long before they are closed; their clients resume with
Last-Event-ID, on this replica's successor or another."""


def main() -> None:
    try:
        settings = GatewaySettings()
        app = create_app(settings)
    except (ConfigurationError, ValidationError) as exc:
        print(f"{Service.GATEWAY}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    configure_logging(settings.log_level, Service.GATEWAY)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=min(STREAMS_CLOSE_SECONDS, max(int(settings.drain_timeout_seconds), 1)),
    )
    server = uvicorn.Server(config)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn re-raises the signal it shut down on once it restored the handlers it found: with these in
    # place, that re-raise only asks again for the stop that already happened, and the process exits 0
    # after a graceful shutdown, like every other service, instead of dying by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
