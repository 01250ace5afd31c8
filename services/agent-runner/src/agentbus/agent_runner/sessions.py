"""Sessions as pure rules: (session record, a task joining or leaving) -> (the record to store, what follows).

A session is one record in its memory store: the conversation so far (turns, and a summary of the oldest),
the task that runs now and those that wait, first come first served. Tasks of a session never interleave:
a task joins before it starts (running at once, waiting, or refused by the store's `on_busy: reject`) and
leaves when it ends, handing the session to the next. The service writes each change compare-and-set, so
two runners never both believe they run a session; a task remembers it left (`closed`), so a late repeat
of its join or leave changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from agentbus.agent_runner.memory import MemoryStoreSpec
from agentbus.contracts.llm import ChatMessage
from agentbus.contracts.sessions import SessionDetail, SessionInfo, SessionTurnView
from pydantic import BaseModel, ConfigDict, Field

CLOSED_KEPT = 64
"""Tasks that left a session, remembered so that a late repeat of their join or leave changes nothing."""
MAX_RECORD_BYTES = 512 * 1024
"""A session record stays well below the stores' value limits (NATS's 1 MiB): the oldest turns go first."""
SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_INSTRUCTIONS = (
    "You summarize conversations between a user and an assistant. Keep every fact, name, number, decision "
    "and open question the rest of the conversation may need; drop greetings and repetition. Reply with the "
    "summary alone, in a few sentences."
)


class SessionTurn(BaseModel):
    """One task's part of a conversation: its input, (its tool calls, when its agent keeps them) and answer."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    at: datetime
    messages: list[ChatMessage]


class SessionRecord(BaseModel):
    """A session as its memory store keeps it."""

    model_config = ConfigDict(frozen=True)

    store: str
    tenant: str
    submitter: str
    session_id: str
    created_at: datetime
    updated_at: datetime
    running: str | None = Field(default=None, description="The task that runs the session now.")
    waiting: list[str] = Field(default_factory=list, description="Tasks waiting for it, first first.")
    summary: str | None = None
    summarized_turns: int = 0
    turns: list[SessionTurn] = Field(default_factory=list)
    closed: list[str] = Field(default_factory=list, description="Tasks that left it, newest last.")


@dataclass(frozen=True)
class SessionKey:
    """Which session: a store's, of a tenant's submitter. The same id elsewhere is another session."""

    store: str
    tenant: str
    submitter: str
    session_id: str

    @property
    def text(self) -> str:
        """The key within its store (ids are identifiers: no dots of their own)."""
        return f"{self.tenant}.{self.submitter}.{self.session_id}"


AdmissionStatus = Literal["running", "waiting", "busy", "left"]


@dataclass(frozen=True)
class Admission:
    """What joining a session gave a task. `running`: it runs now and sees this history; `waiting`: its turn
    comes when the tasks before it ended; `busy`: refused by the store's policy; `left`: it left already."""

    status: AdmissionStatus
    summary: str | None = None
    turns: tuple[SessionTurn, ...] = ()


@dataclass(frozen=True)
class Change:
    """A record to store (None: nothing changed), tasks whose turn has come, and the outcome for the caller."""

    record: SessionRecord | None
    admission: Admission
    signal: tuple[str, ...] = field(default=())


def new_record(key: SessionKey, now: datetime) -> SessionRecord:
    return SessionRecord(
        store=key.store,
        tenant=key.tenant,
        submitter=key.submitter,
        session_id=key.session_id,
        created_at=now,
        updated_at=now,
    )


def _running(record: SessionRecord) -> Admission:
    return Admission("running", record.summary, tuple(record.turns))


def join(
    record: SessionRecord | None,
    key: SessionKey,
    task_id: str,
    now: datetime,
    on_busy: Literal["queue", "reject"],
    leaving: str | None = None,
) -> Change:
    """A task asks for the session: it runs it if nobody does, else waits behind the others (or is refused).

    `leaving`: a task known to be giving the session up (its run ended: a run's end reaches its client before
    the run leaves its session). `on_busy: reject` does not refuse the next turn for a task that is as good as
    gone: that turn waits for the leave, which hands it the session.
    """
    record = record or new_record(key, now)
    if record.running == task_id:
        return Change(None, _running(record))
    if task_id in record.waiting:
        return Change(None, Admission("waiting"))
    if task_id in record.closed:
        return Change(None, Admission("left"))
    if record.running is None and not record.waiting:
        joined = record.model_copy(update={"running": task_id, "updated_at": now})
        return Change(joined, _running(joined))
    about_to_leave = leaving is not None and record.running == leaving and not record.waiting
    if on_busy == "reject" and not about_to_leave:
        return Change(None, Admission("busy"))
    queued = record.model_copy(update={"waiting": [*record.waiting, task_id], "updated_at": now})
    if queued.running is None:
        # Nobody runs it, yet some wait (the runner of the last one was evicted): the first of them goes first.
        promoted = queued.model_copy(update={"running": queued.waiting[0], "waiting": queued.waiting[1:]})
        return Change(promoted, Admission("waiting"), (promoted.running or "",))
    return Change(queued, Admission("waiting"))


@dataclass(frozen=True)
class Departure:
    """A task leaving its session: the turn it adds (a completed task's), and the summary it made, if any."""

    task_id: str
    turn: SessionTurn | None = None
    summary: str | None = None
    folded: tuple[str, ...] = ()
    """Tasks whose turns the summary replaces."""


def leave(
    record: SessionRecord | None, key: SessionKey, departure: Departure, spec: MemoryStoreSpec, now: datetime
) -> Change:
    """A task ended: its turn joins the history (bounded by the store's limits), the next waiting task runs."""
    left = Admission("left")
    if record is None:
        if departure.turn is None:
            return Change(None, left)
        # The session expired while the task ran: the conversation goes on from this turn.
        record = new_record(key, now)
    elif departure.task_id in record.closed:
        # Left before (a repeat after a crash): the task that runs now may not have heard, so tell it again.
        return Change(None, left, (record.running,) if record.running else ())
    turns = list(record.turns)
    summary, summarized = record.summary, record.summarized_turns
    if departure.summary is not None:
        folded = set(departure.folded)
        kept = [turn for turn in turns if turn.task_id not in folded]
        summary, summarized = departure.summary, summarized + len(turns) - len(kept)
        turns = kept
    if departure.turn is not None:
        turns.append(departure.turn)
    turns = _bounded(turns, spec)
    running, waiting = record.running, list(record.waiting)
    signal: tuple[str, ...] = ()
    if running == departure.task_id:
        running = waiting.pop(0) if waiting else None
        signal = (running,) if running else ()
    elif departure.task_id in waiting:
        waiting.remove(departure.task_id)
    updated = record.model_copy(
        update={
            "turns": turns,
            "summary": summary,
            "summarized_turns": summarized,
            "running": running,
            "waiting": waiting,
            "closed": [*record.closed, departure.task_id][-CLOSED_KEPT:],
            "updated_at": now,
        }
    )
    return Change(_within_bytes(updated), left, signal)


def evict(record: SessionRecord, task_id: str, now: datetime) -> Change:
    """Take the session from a task whose run ended without leaving it (it joined after it left): the next
    waiting task runs it."""
    if record.running != task_id:
        return Change(None, Admission("waiting"))
    waiting = list(record.waiting)
    running = waiting.pop(0) if waiting else None
    updated = record.model_copy(
        update={
            "running": running,
            "waiting": waiting,
            "closed": [*record.closed, task_id][-CLOSED_KEPT:],
            "updated_at": now,
        }
    )
    return Change(updated, Admission("waiting"), (running,) if running else ())


def _bounded(turns: list[SessionTurn], spec: MemoryStoreSpec) -> list[SessionTurn]:
    """The newest turns within max_history (at least the newest one, whatever its size)."""
    unit, limit = spec.max_history.unit, spec.max_history.limit
    while len(turns) > 1 and measure(turns, unit) > limit:
        turns = turns[1:]
    return turns


def _within_bytes(record: SessionRecord) -> SessionRecord:
    while len(record.turns) > 1 and len(record.model_dump_json()) > MAX_RECORD_BYTES:
        record = record.model_copy(update={"turns": record.turns[1:]})
    return record


# --- history and its compression ---------------------------------------------------------------------


def estimate_tokens(messages: list[ChatMessage]) -> int:
    """About four characters per token, like the runner's budget estimates."""
    characters = sum(
        len(m.content) + sum(len(json.dumps(c.arguments)) + len(c.name) for c in m.tool_calls) for m in messages
    )
    return characters // 4 + len(messages)


def measure(turns: list[SessionTurn] | tuple[SessionTurn, ...], unit: Literal["messages", "tokens"]) -> int:
    messages = [message for turn in turns for message in turn.messages]
    return len(messages) if unit == "messages" else estimate_tokens(messages)


@dataclass(frozen=True)
class CompactionPlan:
    """The oldest turns to summarize, and the newest kept verbatim."""

    folded: tuple[SessionTurn, ...]
    kept: tuple[SessionTurn, ...]


def plan_compaction(turns: tuple[SessionTurn, ...], spec: MemoryStoreSpec) -> CompactionPlan | None:
    """None while the history is within the store's threshold; else which turns a summary replaces."""
    compression = spec.active_compression
    unit = spec.max_history.unit
    if compression is None or measure(turns, unit) <= compression.threshold:
        return None
    kept: list[SessionTurn] = []
    for turn in reversed(turns):
        if kept and measure([turn, *kept], unit) > compression.keep_recent:
            break
        kept.insert(0, turn)
    folded = turns[: len(turns) - len(kept)]
    return CompactionPlan(tuple(folded), tuple(kept)) if folded else None


def transcript(summary: str | None, turns: tuple[SessionTurn, ...]) -> str:
    """The turns to summarize as plain text (with the summary they extend): what the summarizing model reads."""
    lines = [f"Summary so far: {summary}"] if summary else []
    for turn in turns:
        for message in turn.messages:
            if message.role == "user":
                lines.append(f"User: {message.content}")
            elif message.role == "tool":
                lines.append(f"Tool {message.name or ''}: {message.content}".replace("Tool :", "Tool:"))
            elif message.tool_calls:
                calls = ", ".join(
                    f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)})" for c in message.tool_calls
                )
                lines.append(f"Assistant calls {calls}")
            else:
                lines.append(f"Assistant: {message.content}")
    return "\n".join(lines)


def conversation(
    system_prompt: str, summary: str | None, turns: tuple[SessionTurn, ...], user_input: str
) -> list[ChatMessage]:
    """What the model sees: the agent's prompt, the summary, the turns kept verbatim, then the task's input."""
    messages = [ChatMessage(role="system", content=system_prompt)]
    if summary:
        messages.append(ChatMessage(role="system", content=SUMMARY_PREFIX + summary))
    for turn in turns:
        messages.extend(turn.messages)
    messages.append(ChatMessage(role="user", content=user_input))
    return messages


# --- views -------------------------------------------------------------------------------------------


def info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        session_id=record.session_id,
        store=record.store,
        tenant=record.tenant,
        submitter=record.submitter,
        created_at=record.created_at,
        updated_at=record.updated_at,
        turns=len(record.turns),
        summarized_turns=record.summarized_turns,
        running=record.running,
        waiting=list(record.waiting),
    )


def detail(record: SessionRecord) -> SessionDetail:
    return SessionDetail(
        **info(record).model_dump(),
        summary=record.summary,
        history=[SessionTurnView(task_id=t.task_id, at=t.at, messages=t.messages) for t in record.turns],
    )
