"""The accountant's alerts onto JetStream."""

from __future__ import annotations

from agentbus.contracts.budget import BudgetAlert
from agentbus.contracts.registry import BUDGET_ALERT
from agentbus.runtime.publishing import publish_message
from nats.js import JetStreamContext


class JetStreamAlertSink:
    """Publishes budget alerts with `Nats-Msg-Id` = alert id, so a repeat is dropped by the stream."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, alert: BudgetAlert) -> None:
        await publish_message(self._js, BUDGET_ALERT.format(tenant=alert.tenant), alert, msg_id=alert.alert_id)
