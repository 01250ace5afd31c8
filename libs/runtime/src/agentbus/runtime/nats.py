"""The NATS connection factory: one place that decides reconnect behaviour and credentials."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NatsClient

from agentbus.runtime.settings import ServiceSettings


async def connect_nats(
    servers: str, name: str, *, user: str | None = None, password: str | None = None
) -> NatsClient:
    """Connect, retrying the first connection, and reconnect forever afterwards.

    Services must survive a NATS restart: JetStream keeps their messages, so they simply reconnect.
    """
    return await nats.connect(
        servers=[s.strip() for s in servers.split(",") if s.strip()],
        name=name,
        user=user,
        password=password,
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
    )


async def connect_service(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect with a service's settings."""
    return await connect_nats(settings.nats_url, name, user=settings.nats_user, password=settings.nats_password)
