"""The NATS connection factory: one place that decides reconnect behaviour, credentials and inboxes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import nats
from agentbus.runtime.logging import get_logger
from nats.aio.client import Client as NatsClient

if TYPE_CHECKING:  # the CLI connects without loading the services' settings machinery
    from agentbus.runtime.settings import ServiceSettings

DEFAULT_INBOX_PREFIX = "_INBOX"
RECONNECT_WAIT_SECONDS = 0.5
PING_INTERVAL_SECONDS = 5
MAX_OUTSTANDING_PINGS = 2
"""A server that stops answering without closing the connection (a node partitioned away, a paused or hung
process) is given up on after about 15 s and another node of the cluster is tried; nats-py's default of two
unanswered pings two minutes apart would leave a service waiting on it for four to six minutes."""

_log = get_logger(__name__)

ErrorCallback = Callable[[Exception], Awaitable[None]]


class ConnectionStateLog:
    """Logs a connection's state changes as one structured line each, never a traceback.

    nats-py's default error callback logs every failed reconnect attempt with a multi-line traceback; an
    outage should instead read as: disconnected, reconnecting (attempt n, next try in s), reconnected.
    """

    def __init__(self, name: str, forward: ErrorCallback | None = None) -> None:
        self._name = name
        self._forward = forward
        self._down_since: float | None = None
        self._attempts = 0
        self.client: NatsClient | None = None
        """Set once connected: a disconnection while the client closes on purpose is not an outage."""

    async def disconnected(self) -> None:
        if self.client is not None and (self.client.is_closed or self.client.is_draining):
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._attempts = 0
            _log.warning("nats_disconnected", connection=self._name)

    async def reconnected(self) -> None:
        down = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        _log.info("nats_reconnected", connection=self._name, attempts=self._attempts, down_seconds=round(down, 2))
        self._down_since = None
        self._attempts = 0

    async def closed(self) -> None:
        _log.debug("nats_connection_closed", connection=self._name)

    async def error(self, error: Exception) -> None:
        if self._down_since is not None:
            self._attempts += 1
            _log.warning(
                "nats_reconnecting",
                connection=self._name,
                attempt=self._attempts,
                retry_in_seconds=RECONNECT_WAIT_SECONDS,
                error=f"{error.__class__.__name__}: {error}",
            )
        else:
            _log.warning("nats_error", connection=self._name, error=f"{error.__class__.__name__}: {error}")
        if self._forward is not None:
            await self._forward(error)


def inbox_prefix_for(user: str | None) -> str:
    """The inbox prefix a user's replies arrive under: `_INBOX_<user>` for a named user, else `_INBOX`.

    Every reply (request/reply answers, JetStream acks, pulled and pushed consumer messages) is delivered
    to an inbox. Giving each user its own prefix lets the server allow a user to subscribe to its own
    inboxes only, so no user can read the messages delivered to another.
    """
    return f"{DEFAULT_INBOX_PREFIX}_{user}" if user else DEFAULT_INBOX_PREFIX


async def connect_nats(
    servers: str,
    name: str,
    *,
    user: str | None = None,
    password: str | None = None,
    reconnect_forever: bool = True,
    error_cb: ErrorCallback | None = None,
) -> NatsClient:
    """Connect, and reconnect after a NATS restart: JetStream keeps the messages, so services just resume.

    Services reconnect forever. A command-line client (`reconnect_forever=False`) gives up after a few
    tries so that a person sees an error instead of a hang. `error_cb` receives asynchronous errors such
    as the server's permission violations (a refused publish does not raise at the publisher). State
    changes (disconnected, reconnecting, reconnected) are logged one line each.
    """
    state = ConnectionStateLog(name, error_cb)
    state.client = await nats.connect(
        servers=[s.strip() for s in servers.split(",") if s.strip()],
        name=name,
        user=user,
        password=password,
        inbox_prefix=inbox_prefix_for(user),
        connect_timeout=5,
        reconnect_time_wait=RECONNECT_WAIT_SECONDS,
        ping_interval=PING_INTERVAL_SECONDS,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        max_reconnect_attempts=-1 if reconnect_forever else 2,
        allow_reconnect=True,
        error_cb=state.error,
        disconnected_cb=state.disconnected,
        reconnected_cb=state.reconnected,
        closed_cb=state.closed,
    )
    return state.client


async def connect_service(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect with a service's settings."""
    return await connect_nats(settings.nats_url, name, user=settings.nats_user, password=settings.nats_password)
