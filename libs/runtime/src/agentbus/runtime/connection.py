"""The NATS connection factory: one place that decides reconnect behaviour, credentials and inboxes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
from agentbus.runtime.settings import ServiceSettings
from nats.aio.client import Client as NatsClient

DEFAULT_INBOX_PREFIX = "_INBOX"


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
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect, and reconnect after a NATS restart: JetStream keeps the messages, so services just resume.

    Services reconnect forever. A command-line client (`reconnect_forever=False`) gives up after a few
    tries so that a person sees an error instead of a hang. `error_cb` receives asynchronous errors such
    as the server's permission violations (a refused publish does not raise at the publisher).
    """
    return await nats.connect(
        servers=[s.strip() for s in servers.split(",") if s.strip()],
        name=name,
        user=user,
        password=password,
        inbox_prefix=inbox_prefix_for(user),
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1 if reconnect_forever else 2,
        allow_reconnect=True,
        error_cb=error_cb,
    )


async def connect_service(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect with a service's settings."""
    return await connect_nats(settings.nats_url, name, user=settings.nats_user, password=settings.nats_password)
