"""Internal messages of the agent-runner about its own runs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from agentbus.contracts.common import BusMessage, Identifier
from pydantic import Field


class RunTimer(BusMessage):
    """Wake the runner for one run at `due_at`: to end it at its deadline, or to re-drive a step that waited
    too long. Timers live in a work-queue stream, so they survive restarts and any replica may fire them."""

    task_id: Identifier
    tenant: Identifier
    due_at: datetime = Field(description="When the timer fires (UTC).")
    kind: Literal["deadline", "step"] = Field(description="deadline: end the run; step: re-drive a waiting step.")
    step: int = Field(default=0, ge=0, description="step timers: the step they watch.")
