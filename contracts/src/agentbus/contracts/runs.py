"""Internal messages of the agent-runner about its own runs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from agentbus.contracts.common import BusMessage, Identifier
from pydantic import Field


class RunTimer(BusMessage):
    """Wake the runner for one run at `due_at`: to end it at its deadline, to re-drive a step that waited
    too long, or to start it when its session is free. Timers live in a work-queue stream, so they survive
    restarts and any replica may fire them."""

    task_id: Identifier
    tenant: Identifier
    due_at: datetime = Field(description="When the timer fires (UTC).")
    kind: Literal["deadline", "step", "session"] = Field(
        description="deadline: end the run; step: re-drive a waiting step; session: the run's session has become "
        "free for it (its turn has come), published at once when the task before it ended."
    )
    step: int = Field(default=0, ge=0, description="step timers: the step they watch.")
