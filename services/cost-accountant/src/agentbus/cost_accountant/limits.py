"""Rate limits: requests and tokens per window per tenant, submitter, agent and model; concurrent tasks per tenant.

Limits are decided with the budget reservation, by the owner of the tenant's budget partition, in the same
group commit: one request, one decision. Only LLM reservations count towards the rates (a request is one LLM
call, its tokens the reservation's estimate); the concurrency cap counts the tenant's open tasks (seen by a
reservation and not closed yet) and applies to a task's first reservation.

Windows are fixed and aligned to the epoch (`window_seconds`, 60 by default: the limits are then per minute):
a bucket's level is what its current window has admitted, and it is full again when the next window starts.
Every window boundary is the same instant for every bucket, so a throttled call waits until the window's end.
The levels are not stored apart: an admitted LLM reservation is stored with its tokens, and a partition's new
owner counts the current window's reservations again (see `RateBook.admitted`), so a restart or a take-over
never refills a bucket.

A call over a requests limit is given a place in the first later window that has one (its reservation id holds
it), and waits until that window begins: calls held back wait their turn, first come first served, rather than
all coming back at the next boundary to find it full again. A newcomer is admitted only where the places
promised in its window leave room. Places live in the owner's memory only: after a restart a returning call
asks again like a newcomer. A call over a tokens limit waits for the next window.

A call over a limit waits (the reply says `throttled` and for how long). A limit with `on_limit: reject` refuses
a task's first reservation instead (`rate_limited`): the submission is rejected rather than queued; the later
steps of a task it admitted still wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from agentbus.contracts.common import Identifier
from pydantic import BaseModel, ConfigDict, Field

_EPOCH = datetime(1970, 1, 1)
_PLACES_KEPT = 100_000

REQUESTS = "requests_per_minute"
TOKENS = "tokens_per_minute"
CONCURRENT = "concurrent_tasks"


class RateLimit(BaseModel):
    """The limits of one bucket; a field left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(default=None, ge=1, description="LLM calls admitted per window.")
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Estimated tokens (prompt and completion) admitted per window."
    )
    on_limit: Literal["wait", "reject"] = Field(
        default="wait", description="wait: the step waits for the next window; reject: a new task is rejected."
    )


class TenantRateLimit(RateLimit):
    """A tenant's own limits: its rates, and how many of its tasks may be open at once."""

    concurrent_tasks: int | None = Field(default=None, ge=1, description="Open tasks of the tenant at once.")


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantRateLimit | None = Field(default=None, description="The tenant as a whole.")
    submitters: dict[Identifier, RateLimit] = Field(default_factory=dict, description="Per end user (submitted_by).")
    default_submitter: RateLimit | None = Field(default=None, description="Submitters without limits of their own.")
    agents: dict[Identifier, RateLimit] = Field(default_factory=dict, description="Per agent in this tenant.")
    models: dict[str, RateLimit] = Field(default_factory=dict, description="Per model in this tenant.")


class DefaultLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantRateLimit | None = Field(default=None, description="Tenants not listed.")
    submitter: RateLimit | None = Field(default=None, description="Each submitter with no limits of their own.")
    agent: RateLimit | None = Field(default=None, description="Each agent with no limits of its own.")
    model: RateLimit | None = Field(default=None, description="Each model with no limits of its own.")


class LimitsConfig(BaseModel):
    """config/limits.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="The window the per-minute limits count in (60: per minute)."
    )
    concurrency_retry_seconds: float = Field(
        default=5.0, gt=0, description="How long a task held back by `concurrent_tasks` waits before asking again."
    )
    defaults: DefaultLimits = Field(default_factory=DefaultLimits)
    tenants: dict[Identifier, TenantLimits] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket a call counts in: its name within the tenant ('tenant:acme', 'model:m') and its limits."""

    name: str
    limit: RateLimit


@dataclass(frozen=True, slots=True)
class Throttle:
    """A call held back: by which limit, for how long, and whether it is refused instead (`reject`)."""

    limit: str
    wait_seconds: float
    reject: bool


@dataclass(slots=True)
class Window:
    """What a bucket admitted in one window."""

    index: int
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted LLM reservation as stored: what the rebuild counts again."""

    tenant: str
    agent: str
    user: str | None
    model: str | None
    tokens: int
    at: datetime


@dataclass(frozen=True, slots=True)
class BucketLevel:
    """A bucket's level in the current window, for `agentbus limits show`."""

    bucket: str
    requests: int
    tokens: int
    requests_per_minute: int | None
    tokens_per_minute: int | None
    on_limit: str


class RatePolicy:
    """Which buckets a call counts in, with their limits (the configuration does not change while running)."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.window_seconds = config.window_seconds

    def window_began(self, now: datetime) -> datetime:
        """The start of the window `now` falls in (naive UTC, as `now`)."""
        return _EPOCH + timedelta(seconds=math.floor(_seconds(now) / self.window_seconds) * self.window_seconds)

    def tenant_limit(self, tenant: str) -> TenantRateLimit | None:
        own = self.config.tenants.get(tenant)
        return own.tenant if own is not None and own.tenant is not None else self.config.defaults.tenant

    def buckets(self, tenant: str, agent: str, user: str | None, model: str | None) -> list[Bucket]:
        """The buckets with limits that an LLM call counts in, narrowest first."""
        own = self.config.tenants.get(tenant)
        defaults = self.config.defaults
        found: list[Bucket] = []
        if user is not None:
            limit = own.submitters.get(user) if own is not None else None
            limit = limit or (own.default_submitter if own is not None else None) or defaults.submitter
            if limit is not None:
                found.append(Bucket(f"submitter:{user}", limit))
        agent_limit = (own.agents.get(agent) if own is not None else None) or defaults.agent
        if agent_limit is not None:
            found.append(Bucket(f"agent:{agent}", agent_limit))
        if model is not None:
            model_limit = (own.models.get(model) if own is not None else None) or defaults.model
            if model_limit is not None:
                found.append(Bucket(f"model:{model}", model_limit))
        tenant_limit = self.tenant_limit(tenant)
        if tenant_limit is not None and (tenant_limit.requests_per_minute or tenant_limit.tokens_per_minute):
            found.append(Bucket(f"tenant:{tenant}", tenant_limit))
        return found


def _seconds(moment: datetime) -> float:
    return (moment - _EPOCH).total_seconds()


@dataclass(slots=True)
class RateBook:
    """The rate buckets of one partition, in memory, beside its budget counters (see the module docstring).

    Nothing here does I/O or reads a clock: `now` is the group commit's naive UTC decision time.
    """

    policy: RatePolicy
    windows: dict[tuple[str, str], Window] = field(default_factory=dict)
    """(tenant, bucket) → its current (or last used) window."""
    open_tasks: dict[str, int] = field(default_factory=dict)
    """Tenant → tasks seen by a reservation and not closed."""
    places: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    """(tenant, bucket) → window index → places promised there to calls held back, not yet taken."""
    placed: dict[str, tuple[int, tuple[str, str]]] = field(default_factory=dict)
    """Reservation id → the window and bucket of the place it holds."""

    def _index(self, now: datetime) -> int:
        return math.floor(_seconds(now) / self.policy.window_seconds)

    def check(
        self,
        tenant: str,
        agent: str,
        user: str | None,
        model: str | None,
        tokens: int,
        now: datetime,
        *,
        new_task: bool,
        llm: bool,
        reservation_id: str | None = None,
    ) -> Throttle | None:
        """Whether a call may be made now; a Throttle naming the first limit it would go over, if not.

        A call held back by a requests limit is given a place in a later window under `reservation_id`; when it
        asks again in that window, the place is its own."""
        if new_task:
            tenant_limit = self.policy.tenant_limit(tenant)
            cap = tenant_limit.concurrent_tasks if tenant_limit is not None else None
            if tenant_limit is not None and cap is not None and self.open_tasks.get(tenant, 0) >= cap:
                return Throttle(
                    f"tenant:{tenant}:{CONCURRENT}",
                    self.policy.config.concurrency_retry_seconds,
                    tenant_limit.on_limit == "reject",
                )
        if not llm:
            return None
        index = self._index(now)
        held = self.placed.get(reservation_id) if reservation_id is not None else None
        if held is not None and held[0] > index:
            # Back before its turn (a timer that fired early): it waits for its place.
            return Throttle(f"{held[1][1]}:{REQUESTS}", self._until(held[0], now), False)
        if held is not None and reservation_id is not None:
            self._give_up_place(reservation_id)  # its turn: it takes the place now, or a later one below
        for bucket in self.policy.buckets(tenant, agent, user, model):
            key = (tenant, bucket.name)
            window = self.windows.get(key)
            current = window is not None and window.index == index
            requests, used = (window.requests, window.tokens) if window is not None and current else (0, 0)
            promised = self._promised(key, index)
            limit = bucket.limit
            over: str | None = None
            if limit.requests_per_minute is not None and requests + promised + 1 > limit.requests_per_minute:
                if reservation_id is not None and not (new_task and limit.on_limit == "reject"):
                    turn = self._place(key, reservation_id, index, limit.requests_per_minute)
                    return Throttle(f"{bucket.name}:{REQUESTS}", self._until(turn, now), False)
                over = REQUESTS
            # A call larger than a whole window's tokens is let through alone in an empty window: it would
            # otherwise wait for ever.
            elif limit.tokens_per_minute is not None and used > 0 and used + tokens > limit.tokens_per_minute:
                over = TOKENS
            if over is not None:
                reject = new_task and limit.on_limit == "reject"
                return Throttle(f"{bucket.name}:{over}", self._until(index + 1, now), reject)
        return None

    def _until(self, index: int, now: datetime) -> float:
        """Seconds from `now` until window `index` begins (at least a millisecond)."""
        return round(max(index * self.policy.window_seconds - _seconds(now), 0.001), 3)

    def _promised(self, key: tuple[str, str], index: int) -> int:
        """Places promised in window `index` and not taken yet; those of windows gone by are forgotten."""
        promised = self.places.get(key)
        if not promised:
            return 0
        for gone in [w for w in promised if w < index]:
            del promised[gone]
        return promised.get(index, 0)

    def _place(self, key: tuple[str, str], reservation_id: str, index: int, per_window: int) -> int:
        """Promise the call a place in the first window after `index` with room; returns that window."""
        promised = self.places.setdefault(key, {})
        turn = index + 1
        while promised.get(turn, 0) >= per_window:
            turn += 1
        promised[turn] = promised.get(turn, 0) + 1
        self.placed[reservation_id] = (turn, key)
        if len(self.placed) > _PLACES_KEPT:
            # Places of calls that never came back (their task ended meanwhile) are forgotten.
            for rid in [r for r, (w, _) in self.placed.items() if w < index]:
                del self.placed[rid]
        return turn

    def _give_up_place(self, reservation_id: str) -> None:
        turn, key = self.placed.pop(reservation_id)
        promised = self.places.get(key, {})
        if promised.get(turn, 0) > 1:
            promised[turn] -= 1
        else:
            promised.pop(turn, None)

    def admit(self, admission: Admission, now: datetime) -> None:
        """Count an admitted LLM call in each of its buckets' window of `now` (which must be current)."""
        index = self._index(now)
        for bucket in self.policy.buckets(admission.tenant, admission.agent, admission.user, admission.model):
            key = (admission.tenant, bucket.name)
            window = self.windows.get(key)
            if window is None or window.index != index:
                self.windows[key] = window = Window(index)
            window.requests += 1
            window.tokens += admission.tokens

    def admitted(self, admissions: list[Admission], now: datetime) -> None:
        """Count stored admissions again (a rebuild): those of the current window only."""
        index = self._index(now)
        for admission in admissions:
            if self._index(admission.at) == index:
                self.admit(admission, now)

    def opened(self, tenant: str) -> None:
        self.open_tasks[tenant] = self.open_tasks.get(tenant, 0) + 1

    def closed(self, tenant: str) -> None:
        left = self.open_tasks.get(tenant, 0) - 1
        if left > 0:
            self.open_tasks[tenant] = left
        else:
            self.open_tasks.pop(tenant, None)

    def levels(self, tenant: str, now: datetime) -> list[BucketLevel]:
        """The tenant's buckets that admitted something in the current window, or that have limits of their own."""
        index = self._index(now)
        config = self.policy.config
        own = config.tenants.get(tenant)
        known: dict[str, RateLimit] = {}
        tenant_limit = self.policy.tenant_limit(tenant)
        if tenant_limit is not None:
            known[f"tenant:{tenant}"] = tenant_limit
        if own is not None:
            known.update({f"submitter:{name}": limit for name, limit in own.submitters.items()})
            known.update({f"agent:{name}": limit for name, limit in own.agents.items()})
            known.update({f"model:{name}": limit for name, limit in own.models.items()})
        used = {
            name: window for (owner, name), window in self.windows.items() if owner == tenant and window.index == index
        }
        levels = []
        for name in sorted(set(known) | set(used)):
            limit = known.get(name) or self._default_for(tenant, name)
            window = used.get(name)
            levels.append(
                BucketLevel(
                    bucket=name,
                    requests=window.requests if window is not None else 0,
                    tokens=window.tokens if window is not None else 0,
                    requests_per_minute=limit.requests_per_minute if limit is not None else None,
                    tokens_per_minute=limit.tokens_per_minute if limit is not None else None,
                    on_limit=limit.on_limit if limit is not None else "wait",
                )
            )
        return levels

    def _default_for(self, tenant: str, name: str) -> RateLimit | None:
        kind, _, value = name.partition(":")
        if kind == "submitter":
            buckets = self.policy.buckets(tenant, "", value, None)
        elif kind == "agent":
            buckets = self.policy.buckets(tenant, value, None, None)
        elif kind == "model":
            buckets = self.policy.buckets(tenant, "", None, value)
        else:
            return self.policy.tenant_limit(tenant)
        return next((bucket.limit for bucket in buckets if bucket.name == name), None)
