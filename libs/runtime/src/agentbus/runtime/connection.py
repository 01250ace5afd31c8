"""The NATS connection factory: one place that decides reconnect behaviour and credentials."""

from __future__ import annotations

import nats
from agentbus.runtime.settings import ServiceSettings
from nats.aio.client import Client as NatsClient


async def connect_nats(
    servers: str,
    name: str,
    *,
    user: str | None = None,
    password: str | None = None,
    reconnect_forever: bool = True,
) -> NatsClient:
    """Connect, and reconnect after a NATS restart: JetStream keeps the messages, so services just resume.

    Services reconnect forever. A command-line client (`reconnect_forever=False`) gives up after a few
    tries so that a person sees an error instead of a hang.
    """
    return await nats.connect(
        servers=[s.strip() for s in servers.split(",") if s.strip()],
        name=name,
        user=user,
        password=password,
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1 if reconnect_forever else 2,
        allow_reconnect=True,
    )


async def connect_service(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect with a service's settings."""
    return await connect_nats(settings.nats_url, name, user=settings.nats_user, password=settings.nats_password)
