"""The executor's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ExecutorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "agentbus_tool_calls_total",
            "Tool calls finished, by tool and outcome.",
            ["tool", "outcome"],
            registry=registry,
        )
        self.execution_seconds = Histogram(
            "agentbus_tool_execution_seconds", "Time a tool took to run.", ["tool"], registry=registry
        )
        self.approvals_requested = Counter(
            "agentbus_approvals_requested_total", "Calls that waited for approval.", ["tool"], registry=registry
        )
        self.approvals_resolved = Counter(
            "agentbus_approvals_resolved_total",
            "Approvals resolved, by outcome.",
            ["tool", "outcome"],
            registry=registry,
        )
        self.decisions_refused = Counter(
            "agentbus_approval_decisions_refused_total",
            "Decisions refused (and audited), by reason; the approval stays pending.",
            ["reason"],
            registry=registry,
        )
        self.executions_resumed = Counter(
            "agentbus_tool_executions_resumed_total",
            "Executions a stopped executor left unfinished, by what was done: rerun or interrupted.",
            ["tool", "action"],
            registry=registry,
        )
        self.dependency_waits = Counter(
            "agentbus_tool_dependency_waits_total",
            "Times a running call found what its tool needs unavailable and waited for it, by tool.",
            ["tool"],
            registry=registry,
        )
        self.withdrawals = Counter(
            "agentbus_tool_call_withdrawals_total",
            "Withdrawals of calls whose task ended, by what they found: unseen, awaiting_approval, ready, "
            "running or finished.",
            ["found"],
            registry=registry,
        )
        self.approvals_pending = Gauge(
            "agentbus_approvals_pending", "Approvals waiting for a decision (as of the last sweep).", registry=registry
        )
