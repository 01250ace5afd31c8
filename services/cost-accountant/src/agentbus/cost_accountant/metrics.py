"""The accountant's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

COST_METRIC = "agentbus_cost_usd_total"
TOKENS_METRIC = "agentbus_cost_tokens_total"
GPU_SECONDS_METRIC = "agentbus_cost_gpu_seconds_total"
USAGE_RECORDS_METRIC = "agentbus_cost_usage_records_total"
PRICED_BY_DEFAULT_METRIC = "agentbus_cost_priced_by_default_total"
RESERVATIONS_METRIC = "agentbus_budget_reservations_total"
RESERVATION_SECONDS_METRIC = "agentbus_budget_reservation_seconds"
ALERTS_METRIC = "agentbus_budget_alerts_published_total"
BATCH_SIZE_METRIC = "agentbus_budget_group_commit_operations"
BATCH_SECONDS_METRIC = "agentbus_budget_group_commit_seconds"
COMMIT_SECONDS_METRIC = "agentbus_budget_commit_seconds"
PARTITIONS_METRIC = "agentbus_budget_partitions_owned"

_FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class AccountantMetrics:
    """Cost, tokens and GPU-seconds by tenant and model; reservations by outcome and latency; group commits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cost_usd = Counter(
            COST_METRIC, "Priced cost recorded in the ledger (USD).", ["tenant", "model", "kind"], registry=registry
        )
        self.tokens = Counter(
            TOKENS_METRIC, "Tokens recorded in the ledger.", ["tenant", "model", "direction"], registry=registry
        )
        self.gpu_seconds = Counter(
            GPU_SECONDS_METRIC, "GPU-seconds recorded in the ledger.", ["tenant", "node_class"], registry=registry
        )
        self.usage_records = Counter(
            USAGE_RECORDS_METRIC,
            "Usage records handled, by outcome (recorded, duplicate).",
            ["outcome"],
            registry=registry,
        )
        self.priced_by_default = Counter(
            PRICED_BY_DEFAULT_METRIC,
            "Usage records priced by a default rule because their model, node class or tool has no price.",
            ["tenant", "model"],
            registry=registry,
        )
        self.reservations = Counter(
            RESERVATIONS_METRIC,
            "Budget reservations, by outcome (allowed, denied, closed, error, throttled, rate_limited).",
            ["outcome"],
            registry=registry,
        )
        self.reservation_seconds = Histogram(
            RESERVATION_SECONDS_METRIC,
            "Time from a reservation's arrival to its committed verdict.",
            registry=registry,
            buckets=_FAST_BUCKETS,
        )
        self.alerts = Counter(ALERTS_METRIC, "Soft-limit alerts published.", ["tenant"], registry=registry)
        self.batch_size = Histogram(
            BATCH_SIZE_METRIC,
            "Operations (reservations, usage records, closes, expiries) decided and written per group commit.",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_seconds = Histogram(
            BATCH_SECONDS_METRIC,
            "Time of one group commit: reads, decisions, the transaction and the answers.",
            registry=registry,
            buckets=_FAST_BUCKETS,
        )
        self.commit_seconds = Histogram(
            COMMIT_SECONDS_METRIC, "Time of one group commit's transaction.", registry=registry, buckets=_FAST_BUCKETS
        )
        self.partitions_owned = Gauge(
            PARTITIONS_METRIC, "Budget partitions whose lease this replica holds.", registry=registry
        )
