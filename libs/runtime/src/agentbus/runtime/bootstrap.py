"""Create or update every stream, durable consumer and KV bucket from the registry. Idempotent.

Run once per deployment (`agentbus streams apply`, the bootstrap Job), never implicitly by whichever
service starts first. Updating matters: a consumer whose ack_wait or max_deliver changed in the
registry is changed on the server too.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentbus.contracts import registry
from agentbus.contracts.registry import ConsumerSpec, KeyValueSpec, Retention, StreamSpec
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class AppliedChange:
    """One thing the bootstrap did: kind (stream, consumer, kv), its name, and created/updated."""

    kind: str
    name: str
    action: str


def stream_config(spec: StreamSpec, replicas: int) -> StreamConfig:
    """The server-side configuration of a stream spec."""
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.WORK_QUEUE if spec.retention is Retention.WORK_QUEUE else RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=spec.max_age_seconds or None,
        max_bytes=spec.max_bytes,
        max_msg_size=spec.max_msg_size,
        duplicate_window=spec.duplicate_window_seconds,
        allow_msg_schedules=spec.allow_msg_schedules or None,
        allow_direct=True,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    """The server-side configuration of a durable pull consumer spec."""
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        description=spec.description,
        filter_subject=spec.filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_seconds,
        # The consumer runtime decides when to give up (a dependency outage never counts): the server must
        # not drop a message on its own after some number of deliveries.
        max_deliver=-1,
        max_ack_pending=spec.max_ack_pending,
        backoff=list(spec.backoff_seconds) or None,
    )


_STREAM_FIELDS = (
    "description",
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "max_age",
    "max_bytes",
    "max_msg_size",
    "duplicate_window",
    "allow_msg_schedules",
    "allow_direct",
)
_CONSUMER_FIELDS = (
    "description",
    "filter_subject",
    "deliver_policy",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "backoff",
)


def _differs(current: object, desired: object, fields: tuple[str, ...]) -> bool:
    """Whether the server's configuration differs from the desired one in a field the registry sets."""

    def normal(value: object) -> object:
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, list):
            return [normal(v) for v in value]
        return value.value if hasattr(value, "value") else value

    return any(
        normal(getattr(current, name)) != normal(getattr(desired, name))
        for name in fields
        if getattr(desired, name) is not None
    )


async def _apply_stream(js: JetStreamContext, spec: StreamSpec, replicas: int | None) -> AppliedChange:
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        await js.add_stream(stream_config(spec, replicas or 1))
        return AppliedChange("stream", spec.name, "created")
    config = stream_config(spec, replicas or info.config.num_replicas or 1)
    if not _differs(info.config, config, _STREAM_FIELDS):
        return AppliedChange("stream", spec.name, "unchanged")
    await js.update_stream(config)
    return AppliedChange("stream", spec.name, "updated")


async def _apply_consumer(js: JetStreamContext, spec: ConsumerSpec) -> AppliedChange:
    config = consumer_config(spec)
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        action = "created"
    else:
        if not _differs(info.config, config, _CONSUMER_FIELDS):
            return AppliedChange("consumer", spec.durable, "unchanged")
        action = "updated"
    # With `name` set, nats-py uses CONSUMER.CREATE, which the server treats as create-or-update.
    await js.add_consumer(spec.stream, config)
    return AppliedChange("consumer", spec.durable, action)


async def _apply_bucket(js: JetStreamContext, spec: KeyValueSpec, replicas: int | None) -> AppliedChange:
    try:
        await js.key_value(spec.bucket)
    except NotFoundError:
        await js.create_key_value(
            bucket=spec.bucket,
            description=spec.description,
            history=spec.history,
            max_value_size=spec.max_value_size,
            storage=StorageType.FILE,
            replicas=replicas or 1,
        )
        return AppliedChange("kv", spec.bucket, "created")
    return AppliedChange("kv", spec.bucket, "exists")


async def apply_topology(
    js: JetStreamContext, models: tuple[str, ...] = registry.DEFAULT_MODELS, replicas: int | None = None
) -> list[AppliedChange]:
    """Create or update every stream, consumer (with one inference consumer per model) and KV bucket.

    `replicas` sets every stream's replica count (3 on a production cluster). Without it, new streams and
    buckets get one replica and existing ones keep theirs: a service or `agentbus up --nats-url` attached to
    a cluster must never scale its R3 streams down to one copy.
    """
    changes = [await _apply_stream(js, stream, replicas) for stream in registry.STREAMS]
    changes += [await _apply_consumer(js, consumer) for consumer in registry.consumers(models)]
    changes += [await _apply_bucket(js, bucket, replicas) for bucket in registry.KEY_VALUE_BUCKETS]
    return changes
