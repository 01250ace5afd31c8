"""Reading a stream's messages on one subject, under permissions that name that subject.

An ordered consumer is created through `$JS.API.CONSUMER.CREATE.<stream>`, a subject that does not say
which messages it will read, so a server can only allow it to everyone or no one. Here the consumer gets
a name and a single filter, which the client puts into the create subject
(`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): permissions on that subject decide exactly what a
user may read. The consumer pushes to the caller's own inbox, acks nothing, and is removed by the server
once nobody listens.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

INACTIVE_THRESHOLD_SECONDS = 30.0


@dataclass
class Replay:
    """A live subscription to a stream's messages on one subject. `backlog`: messages already stored
    when it started (with `DeliverPolicy.ALL`), so a reader knows when it has caught up."""

    subscription: Subscription
    backlog: int

    async def close(self) -> None:
        await self.subscription.unsubscribe()


async def replay(
    nc: NatsClient,
    stream: str,
    subject: str,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    timeout: float = 5.0,
) -> Replay:
    """Subscribe first, then create the consumer, so that no message is missed between the two."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        info = await nc.jetstream().add_consumer(
            stream,
            ConsumerConfig(
                name=f"replay-{uuid.uuid4().hex}",
                filter_subject=subject,
                deliver_subject=inbox,
                deliver_policy=deliver_policy,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=INACTIVE_THRESHOLD_SECONDS,
                mem_storage=True,
                num_replicas=1,
            ),
            timeout=timeout,
        )
    except BaseException:
        await subscription.unsubscribe()
        raise
    return Replay(subscription, info.num_pending or 0)
