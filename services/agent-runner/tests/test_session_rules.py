"""Sessions as pure rules: joining and leaving in order, repeats that change nothing, bounded history, what a
summary replaces, and memory store files that stop start-up naming file and field."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agentbus.agent_runner import sessions
from agentbus.agent_runner.memory import MemorySpecError, MemoryStoreSpec, load_memory_specs
from agentbus.agent_runner.sessions import Departure, SessionKey, SessionRecord, SessionTurn
from agentbus.contracts.llm import ChatMessage

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = SessionKey("conversations", "acme", "ada", "s1")
QUEUE = MemoryStoreSpec(name="conversations")
SUMMARIZING = MemoryStoreSpec.model_validate(
    {
        "name": "conversations",
        "max_history": {"messages": 20},
        "compression": {"threshold": 4, "keep_recent": 2, "model": "scripted"},
    }
)


def _turn(task_id: str) -> SessionTurn:
    return SessionTurn(
        task_id=task_id,
        at=NOW,
        messages=[ChatMessage(role="user", content=f"q {task_id}"), ChatMessage(role="assistant", content="a")],
    )


def _joined(record: SessionRecord | None, task_id: str, on_busy: str = "queue") -> SessionRecord:
    change = sessions.join(record, KEY, task_id, NOW, on_busy)  # type: ignore[arg-type]
    assert change.record is not None
    return change.record


def test_the_first_task_runs_the_others_wait_in_order_and_each_ending_hands_it_on() -> None:
    record = _joined(None, "t1")
    assert record.running == "t1"
    record = _joined(_joined(record, "t2"), "t3")
    assert (record.running, record.waiting) == ("t1", ["t2", "t3"])
    change = sessions.leave(record, KEY, Departure("t1", _turn("t1")), QUEUE, NOW)
    assert change.signal == ("t2",)
    assert change.record is not None
    assert (change.record.running, change.record.waiting) == ("t2", ["t3"])
    admitted = sessions.join(change.record, KEY, "t2", NOW, "queue")
    assert admitted.admission.status == "running"
    assert [turn.task_id for turn in admitted.admission.turns] == ["t1"]


def test_repeats_of_a_join_or_a_leave_change_nothing() -> None:
    record = _joined(_joined(None, "t1"), "t2")
    assert sessions.join(record, KEY, "t1", NOW, "queue").record is None
    assert sessions.join(record, KEY, "t2", NOW, "queue").admission.status == "waiting"
    left = sessions.leave(record, KEY, Departure("t1", _turn("t1")), QUEUE, NOW).record
    assert left is not None
    again = sessions.leave(left, KEY, Departure("t1", _turn("t1")), QUEUE, NOW)
    assert again.record is None
    assert again.signal == ("t2",), "the running task hears again that its turn came"
    assert sessions.join(left, KEY, "t1", NOW, "queue").admission.status == "left"
    assert len(left.turns) == 1


def test_a_busy_session_refuses_a_task_by_policy() -> None:
    record = _joined(None, "t1")
    change = sessions.join(record, KEY, "t2", NOW, "reject")
    assert change.record is None
    assert change.admission.status == "busy"


def test_a_strict_session_queues_the_next_task_behind_one_that_ended_and_has_yet_to_leave() -> None:
    record = _joined(None, "t1")
    change = sessions.join(record, KEY, "t2", NOW, "reject", leaving="t1")
    assert change.admission.status == "waiting"
    assert change.record is not None
    assert (change.record.running, change.record.waiting) == ("t1", ["t2"])
    left = sessions.leave(change.record, KEY, Departure("t1", _turn("t1")), QUEUE, NOW)
    assert left.signal == ("t2",), "the leave hands the session to the task that waited for it"
    assert left.record is not None
    admitted = sessions.join(left.record, KEY, "t2", NOW, "reject")
    assert admitted.admission.status == "running"
    assert [turn.task_id for turn in admitted.admission.turns] == ["t1"]


def test_a_strict_session_still_refuses_while_the_running_task_goes_on_or_another_waits() -> None:
    record = _joined(None, "t1")
    assert sessions.join(record, KEY, "t2", NOW, "reject", leaving="t9").admission.status == "busy"
    queued = sessions.join(record, KEY, "t2", NOW, "reject", leaving="t1").record
    assert queued is not None
    third = sessions.join(queued, KEY, "t3", NOW, "reject", leaving="t1")
    assert third.admission.status == "busy", "t2 runs next: t3 would wait for a task that has not ended"
    assert third.record is None


def test_history_keeps_the_newest_turns_within_max_history() -> None:
    spec = MemoryStoreSpec.model_validate({"name": "conversations", "max_history": {"messages": 4}})
    record: SessionRecord | None = None
    for n in range(1, 5):
        record = _joined(record, f"t{n}")
        change = sessions.leave(record, KEY, Departure(f"t{n}", _turn(f"t{n}")), spec, NOW)
        record = change.record
    assert record is not None
    assert [turn.task_id for turn in record.turns] == ["t3", "t4"]


def test_past_the_threshold_the_oldest_turns_are_planned_for_a_summary_and_replaced_by_it() -> None:
    turns: tuple[SessionTurn, ...] = (_turn("t1"), _turn("t2"))
    assert sessions.plan_compaction(turns, SUMMARIZING) is None, "4 messages are not past a threshold of 4"
    turns = (*turns, _turn("t3"))
    plan = sessions.plan_compaction(turns, SUMMARIZING)
    assert plan is not None
    assert [t.task_id for t in plan.folded] == ["t1", "t2"]
    assert [t.task_id for t in plan.kept] == ["t3"]
    record = SessionRecord(
        store="conversations", tenant="acme", submitter="ada", session_id="s1", created_at=NOW, updated_at=NOW,
        running="t4", turns=list(turns),
    )  # fmt: skip
    departure = Departure("t4", _turn("t4"), summary="S", folded=("t1", "t2"))
    left = sessions.leave(record, KEY, departure, SUMMARIZING, NOW).record
    assert left is not None
    assert (left.summary, left.summarized_turns) == ("S", 2)
    assert [t.task_id for t in left.turns] == ["t3", "t4"]
    messages = sessions.conversation("prompt", left.summary, tuple(left.turns), "next")
    assert [m.role for m in messages] == ["system", "system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1].content == sessions.SUMMARY_PREFIX + "S"
    assert messages[-1].content == "next"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("name: m\ntype: redis\n", "(top level)"),
        ("name: m\nmax_history: {messages: 0}\n", "max_history.messages"),
        ("name: m\ncompression: {threshold: 3, keep_recent: 3, model: scripted}\n", "compression"),
        ("name: m\nttl: 5\n", "ttl"),
        ("name: m\nlong_term: {collection: 'not an id'}\n", "long_term.collection"),
    ],
)
def test_a_bad_memory_file_names_its_file_and_field(tmp_path: Path, content: str, field: str) -> None:
    (tmp_path / "m.yaml").write_text(content, encoding="utf-8")
    with pytest.raises(MemorySpecError, match=re.escape(f"m.yaml: field '{field}'")):
        load_memory_specs(tmp_path)


def test_a_store_defined_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: m\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("name: m\n", encoding="utf-8")
    with pytest.raises(MemorySpecError, match=r"b\.yaml: field 'name'"):
        load_memory_specs(tmp_path)
