"""Prometheus metrics every consumer exports. Each service owns a CollectorRegistry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

HANDLED_METRIC = "agentbus_messages_handled_total"
HANDLER_SECONDS_METRIC = "agentbus_handler_seconds"
DEAD_LETTERS_METRIC = "agentbus_dead_letters_total"


class ConsumerMetrics:
    """Outcome counts, handler latency and dead letters, labelled by durable consumer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            HANDLED_METRIC,
            "Messages handled, by consumer and outcome (acked, retried, dead_lettered, waiting, passed_over).",
            ["consumer", "outcome"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            HANDLER_SECONDS_METRIC,
            "Time a handler took per message.",
            ["consumer"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.dead_letters = Counter(
            DEAD_LETTERS_METRIC,
            "Messages moved to the dead-letter stream, by consumer and error code.",
            ["consumer", "code"],
            registry=registry,
        )
