"""Test-only fault injection: stop forever at a named point, so a test can SIGKILL the process exactly there."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)


class FaultPoints:
    """The points are the moments that matter for exactly-once: `call_published` (approval request published,
    call not acked), `decision_committed` (approval committed, tool not started), `effect_applied` (a
    transactional tool's effect written, not committed), `execution_finished` (a tool finished, its outcome not
    recorded), `execution_committed` (outcome recorded, not published), and `call_before_ack` /
    `decision_before_ack` (everything published, the call or decision message not acked). A marker file named
    after the point is written first, so the test knows it was reached.
    """

    def __init__(self, pause_at: str | None = None, marker_dir: Path | None = None) -> None:
        self._pause_at = pause_at
        self._marker_dir = marker_dir

    async def reach(self, point: str) -> None:
        if point != self._pause_at:
            return
        if self._marker_dir is not None:
            (self._marker_dir / point).write_text(str(os.getpid()))
        _log.warning("fault_pause_reached", point=point)
        await asyncio.Event().wait()
