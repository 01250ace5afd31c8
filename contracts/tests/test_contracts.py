"""Contract drift and registry invariants."""

from __future__ import annotations

import json
import re
from pathlib import Path

import agentbus.contracts as contracts
import pytest
from agentbus.contracts import registry
from agentbus.contracts.approvals import ApprovalDecision
from agentbus.contracts.asyncapi import asyncapi_document
from agentbus.contracts.schemas import message_schemas, render
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TaskSubmitted
from pydantic import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_committed_json_schemas_match_the_models() -> None:
    schemas = message_schemas()
    committed = {p.stem: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.json")}
    assert set(committed) == set(schemas), "run `make schemas` and commit contracts/schemas"
    for name, schema in schemas.items():
        assert committed[name] == render(schema), f"{name}.json drifted: run `make schemas` and commit it"


def test_committed_asyncapi_document_matches_the_registry() -> None:
    generated = json.dumps(asyncapi_document(), indent=2, ensure_ascii=False) + "\n"
    assert ASYNCAPI_PATH.read_text(encoding="utf-8") == generated, "run `make docs` and commit docs/asyncapi.json"


def test_subject_patterns_are_unique_and_each_lies_in_exactly_its_stream() -> None:
    patterns = [s.pattern for s in registry.SUBJECTS]
    assert len(patterns) == len(set(patterns))
    for subject in registry.SUBJECTS:
        if subject.stream is None:
            # A stream capturing a request/reply subject would answer the request with its own ack.
            captured = [st.name for st in registry.STREAMS for s in st.subjects if _overlaps(s, subject.wildcard)]
            assert captured == [], f"{subject.pattern} is core NATS but {captured} capture it"
            continue
        owners = [st.name for st in registry.STREAMS if subject.wildcard in st.subjects]
        assert owners == [subject.stream], f"{subject.pattern} must be captured by exactly {subject.stream}"


def _overlaps(a: str, b: str) -> bool:
    pa, pb = a.split("."), b.split(".")
    return len(pa) == len(pb) and all(x == y or "*" in (x, y) for x, y in zip(pa, pb, strict=True))


def test_stream_subjects_do_not_overlap() -> None:
    # JetStream refuses overlapping stream subjects; check the registry before a server does.
    all_subjects = [(st.name, s) for st in registry.STREAMS for s in st.subjects]
    for i, (name_a, a) in enumerate(all_subjects):
        for name_b, b in all_subjects[i + 1 :]:
            assert not _overlaps(a, b), f"{name_a}:{a} overlaps {name_b}:{b}"


def test_every_durable_is_valid_and_filters_inside_its_stream() -> None:
    consumers = registry.consumers(("scripted", "llama-3-8b"))
    durables = [c.durable for c in consumers]
    assert len(durables) == len(set(durables))
    for consumer in consumers:
        assert registry.DURABLE_NAME_PATTERN.fullmatch(consumer.durable), consumer.durable
        stream = registry.stream_named(consumer.stream)
        filter_parts = consumer.filter_subject.split(".")
        assert any(
            len(s.split(".")) == len(filter_parts)
            and all(f == p or p == "*" for f, p in zip(filter_parts, s.split("."), strict=True))
            for s in stream.subjects
        ), f"{consumer.durable} filters {consumer.filter_subject} outside {stream.name}"
        assert consumer.max_deliver >= 1
        assert consumer.max_deliver > len(consumer.backoff_seconds)


def test_work_queue_consumers_do_not_overlap_on_a_stream() -> None:
    # A work-queue stream refuses two consumers with overlapping filters.
    consumers = registry.consumers(("scripted", "other"))
    for stream in registry.STREAMS:
        if stream.retention is not registry.Retention.WORK_QUEUE:
            continue
        filters = [c.filter_subject for c in consumers if c.stream == stream.name]
        assert len(filters) == len(set(filters)), stream.name


def test_names_are_valid_on_the_server() -> None:
    for stream in registry.STREAMS:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", stream.name)
    for bucket in registry.KEY_VALUE_BUCKETS:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", bucket.bucket)


def test_subject_format_refuses_tokens_that_would_change_the_subject() -> None:
    for bad in ("a.b", "*", ">", "", "a b"):
        with pytest.raises(ValueError, match="subject token"):
            registry.TASK_SUBMIT.format(tenant=bad)
    assert registry.TASK_EVENT.parse("agentbus.tasks.events.acme.t1") == {"tenant": "acme", "task_id": "t1"}
    with pytest.raises(ValueError, match="does not match"):
        registry.TASK_EVENT.parse("agentbus.tasks.events.acme")


def test_bus_messages_ignore_unknown_fields_but_human_decisions_reject_them() -> None:
    submitted = TaskSubmitted.model_validate(
        {"task_id": "t1", "tenant": "acme", "agent": "echo", "input": "hi", "future_field": 1}
    )
    assert submitted.schema_version == 1
    with pytest.raises(ValidationError, match="Extra inputs"):
        ApprovalDecision.model_validate(
            {
                "approval_id": "a1",
                "decision": "approve",
                "approver": "alice",
                "arguments_sha256": "0" * 64,
                "sneaky": True,
            }
        )


@pytest.mark.parametrize("bad_id", ["", "has space", "dot.ted", "x" * 65, "star*"])
def test_identifiers_are_safe_subject_tokens(bad_id: str) -> None:
    with pytest.raises(ValidationError):
        TaskSubmitted(task_id=bad_id, tenant="acme", agent="echo", input="hi")


def test_task_events_are_told_apart_by_kind() -> None:
    event = TASK_EVENT_ADAPTER.validate_python(
        {"task_id": "t", "tenant": "a", "seq": 1, "kind": "rejected", "error": {"code": "x", "message": "y"}}
    )
    assert event.kind == "rejected"
    with pytest.raises(ValidationError):
        TASK_EVENT_ADAPTER.validate_python({"task_id": "t", "tenant": "a", "seq": 1, "kind": "nonsense"})


def test_public_surface_is_complete() -> None:
    exported = set(contracts.__all__)
    public = {name for name in dir(contracts) if not name.startswith("_") and name[0].isupper()}
    public -= {"annotations"}
    assert public <= exported | {"approvals", "common", "deadletter", "llm", "rag", "tasks", "usage"}
