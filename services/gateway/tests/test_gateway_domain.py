"""The gateway's pure rules: following events without gaps or repeats, task state, approvals as shown,
cost bars, who may act in which tenant, and signed tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from agentbus.contracts.approvals import ApprovalRequested, arguments_sha256
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.tasks import (
    TaskAccepted,
    TaskApprovalPending,
    TaskApprovalResolved,
    TaskCompleted,
    TaskEvent,
    TaskFailed,
    TaskStep,
    TaskToken,
)
from agentbus.gateway.adapters.tokens import TokenSigner
from agentbus.gateway.domain import (
    ApprovalView,
    CostRow,
    EventCursor,
    ForbiddenError,
    Identity,
    InvalidRequestError,
    Limit,
    Role,
    cost_bars,
    human_duration,
    last_event_id,
    task_state,
)

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _token(seq: int, step: int, chunk: int) -> TaskToken:
    return TaskToken(task_id="t1", tenant="acme", seq=seq, step=step, chunk=chunk, text=f"c{chunk}")


def _run() -> list[TaskEvent]:
    return [
        TaskAccepted(task_id="t1", tenant="acme", seq=1, agent="ops", model="scripted", max_steps=4),
        _token(1, 1, 1),
        _token(1, 1, 2),
        TaskStep(task_id="t1", tenant="acme", seq=2, step=1),
        TaskApprovalPending(task_id="t1", tenant="acme", seq=3, approval_id="a1", tool="create_ticket"),
        TaskApprovalResolved(task_id="t1", tenant="acme", seq=4, approval_id="a1", outcome="approved", by="alice"),
        TaskCompleted(
            task_id="t1", tenant="acme", seq=5, output="done", usage=TokenUsage(prompt_tokens=3), cost_usd=0.25, steps=2
        ),
    ]


def _passed(cursor: EventCursor, events: list[TaskEvent]) -> list[tuple[str, int, int]]:
    return [(e.kind, e.seq, getattr(e, "chunk", 0)) for e in events if cursor.accept(e)]


def test_cursor_passes_each_event_once_in_order_whatever_is_repeated() -> None:
    run = _run()
    cursor = EventCursor()
    # Live and replayed copies interleaved: the first three, then everything again, then the last twice.
    seen = _passed(cursor, run[:3]) + _passed(cursor, run) + _passed(cursor, run[-1:])
    assert seen == [(e.kind, e.seq, getattr(e, "chunk", 0)) for e in run]


def test_cursor_tells_a_gap_and_skips_tokens_of_finished_steps() -> None:
    run = _run()
    cursor = EventCursor(next_seq=3)
    assert cursor.gap_before(run[5])  # seq 4 while 3 is next
    assert not cursor.gap_before(run[4])
    assert not cursor.accept(run[1])  # a token of step 1, which seq 2 already finished
    assert cursor.accept(run[4])
    assert not cursor.accept(run[4])


def test_a_resumed_cursor_starts_after_the_last_seen_event() -> None:
    cursor = EventCursor(next_seq=3)
    assert _passed(cursor, _run()) == [("approval_pending", 3, 0), ("approval_resolved", 4, 0), ("completed", 5, 0)]


def test_task_state_follows_the_events() -> None:
    run = _run()
    waiting = task_state(run[:5])
    assert waiting is not None
    assert (waiting.status, waiting.pending_approvals, waiting.last_seq, waiting.steps) == (
        "waiting_for_approval",
        ["a1"],
        3,
        1,
    )
    done = task_state(run)
    assert done is not None
    assert (done.status, done.output, done.cost_usd, done.pending_approvals, done.ended_at) == (
        "completed",
        "done",
        0.25,
        [],
        run[-1].at,
    )
    failed = task_state(
        [run[0], TaskFailed(task_id="t1", tenant="acme", seq=2, error=ErrorInfo(code="llm_error", message="down"))]
    )
    assert failed is not None
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "llm_error"
    assert task_state([]) is None


def _request(tool: str, arguments: dict[str, object]) -> ApprovalRequested:
    return ApprovalRequested(
        approval_id="a1",
        task_id="t1",
        tenant="acme",
        agent="deploy-assistant",
        tool=tool,
        arguments=arguments,
        arguments_sha256=arguments_sha256(arguments),
        risk="high",
        reason="why",
        requested_at=NOW - timedelta(minutes=90),
        expires_at=NOW + timedelta(hours=3),
    )


def test_kubectl_manifests_are_shown_as_yaml_beside_the_exact_arguments() -> None:
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n"
    view = ApprovalView.of(_request("kubectl_apply", {"manifest": manifest}), NOW)
    assert view.manifests_yaml == manifest
    assert '"manifest": "apiVersion: v1\\nkind: ConfigMap' in view.arguments_json
    assert (view.age, view.expires, view.expired) == ("1h 30m", "in 3h", False)
    plain = ApprovalView.of(_request("create_ticket", {"title": "db down", "priority": "high"}), NOW)
    assert plain.manifests_yaml is None
    assert plain.arguments_json == '{\n  "priority": "high",\n  "title": "db down"\n}'


def test_expired_approvals_say_so() -> None:
    view = ApprovalView.of(_request("create_ticket", {"title": "x"}), NOW + timedelta(hours=4))
    assert (view.expired, view.expires) == (True, "1h ago")


def test_cost_bars_share_one_scale_including_the_limits() -> None:
    rows = [CostRow("acme", 30.0, 5), CostRow("globex", 10.0, 2)]
    bars = cost_bars(rows, {"acme": Limit(soft_usd=Decimal(20), hard_usd=Decimal(60)), "globex": None})
    acme, globex = bars
    assert acme.scale_usd == 60.0
    assert (acme.fraction(acme.cost_usd), acme.fraction(acme.soft_usd), acme.fraction(acme.hard_usd)) == (0.5, 1 / 3, 1)
    assert (acme.over_soft, acme.over_hard) == (True, False)
    assert (globex.soft_usd, globex.hard_usd, globex.fraction(globex.cost_usd)) == (None, None, 1 / 6)
    assert cost_bars([], {}) == []


def test_an_identity_acts_only_in_its_own_tenants_and_roles() -> None:
    alice = Identity("alice", submits_for=("acme",), approves_for=("acme", "globex"))
    assert alice.submitter("acme").role is Role.SUBMITTER
    assert alice.approver("globex").role is Role.APPROVER
    with pytest.raises(ForbiddenError):
        alice.submitter("globex")
    with pytest.raises(ForbiddenError):
        alice.reader("globex")  # approvers may not read task events
    with pytest.raises(ForbiddenError):
        alice.require_operator()
    assert alice.only_tenant(alice.submits_for, "read tasks") == "acme"
    with pytest.raises(InvalidRequestError):
        alice.only_tenant(alice.approves_for, "decide")


@pytest.mark.parametrize(("header", "seq"), [(None, 0), ("", 0), ("7", 7), (" 12 ", 12)])
def test_last_event_id_is_a_seq(header: str | None, seq: int) -> None:
    assert last_event_id(header) == seq


@pytest.mark.parametrize("header", ["x", "-1", "1.5"])
def test_a_last_event_id_that_is_no_seq_is_refused(header: str) -> None:
    with pytest.raises(InvalidRequestError):
        last_event_id(header)


def test_human_durations() -> None:
    assert [human_duration(s) for s in (5, 125, 3 * 3600, 26 * 3600 + 60)] == ["5s", "2m", "3h", "1d 2h"]


def test_tokens_name_their_identity_and_nothing_forged() -> None:
    signer = TokenSigner("s" * 40, max_age_seconds=3600)
    token, expires_at = signer.issue("alice")
    assert signer.identity_of(token) == "alice"
    assert expires_at > datetime.now(UTC)
    assert signer.identity_of(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]) is None
    assert TokenSigner("t" * 40, max_age_seconds=3600).identity_of(token) is None
    assert signer.identity_of("not-a-token") is None
