"""A workflow's concurrency limit in one tenant, as pure rules: who holds a slot, who waits for one.

A run asks for a slot once (acquire) and gives it back once it ended (release); both are idempotent, so
asking again after a crash gets the same answer. Beyond `maxConcurrent` the policy decides: `queue` (the run
waits, first come first served, and is admitted when a slot frees), `reject`, or `replace` (the oldest
running run is cancelled and the new one takes its slot). Admitting a queued run and replacing a running one
are announced to those runs as messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agentbus.contracts.workflows import ConcurrencyPolicy
from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["admitted", "queued", "rejected"]


class SlotsState(BaseModel):
    """Runs of one workflow in one tenant that hold a slot, oldest first, and those queued for one."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    workflow: str
    active: list[str] = Field(default_factory=list)
    queue: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class SlotsTransition:
    """The new slots, and the runs to tell: admitted from the queue, or replaced (by which run)."""

    state: SlotsState
    outcome: Outcome | None = None
    admit: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)
    changed: bool = True


def acquire(
    slots: SlotsState | None, tenant: str, workflow: str, run_id: str, limit: int, policy: ConcurrencyPolicy
) -> SlotsTransition:
    """A slot for `run_id`, a place in the queue, or a refusal; asking again gives the same answer."""
    slots = slots or SlotsState(tenant=tenant, workflow=workflow)
    if run_id in slots.active:
        return SlotsTransition(slots, "admitted", changed=False)
    if run_id in slots.queue:
        return SlotsTransition(slots, "queued", changed=False)
    if len(slots.active) < limit:
        return SlotsTransition(slots.model_copy(update={"active": [*slots.active, run_id]}), "admitted")
    if policy == "queue":
        return SlotsTransition(slots.model_copy(update={"queue": [*slots.queue, run_id]}), "queued")
    if policy == "reject":
        return SlotsTransition(slots, "rejected", changed=False)
    oldest, *others = slots.active
    return SlotsTransition(
        slots.model_copy(update={"active": [*others, run_id]}), "admitted", replace=[(oldest, run_id)]
    )


def release(slots: SlotsState | None, run_id: str, limit: int) -> SlotsTransition | None:
    """Give `run_id`'s slot (or its queue place) back and admit whoever waits first; None if it held none."""
    if slots is None or (run_id not in slots.active and run_id not in slots.queue):
        return None
    active = [r for r in slots.active if r != run_id]
    queue = [r for r in slots.queue if r != run_id]
    admit: list[str] = []
    while queue and len(active) < limit:
        first, *queue = queue
        active.append(first)
        admit.append(first)
    return SlotsTransition(slots.model_copy(update={"active": active, "queue": queue}), admit=admit)
