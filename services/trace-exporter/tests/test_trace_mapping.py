"""How a span event becomes what Langfuse reads: trace fields, observation types, usage, cost, redaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from agentbus.contracts.spans import SpanKind, SpanRecorded
from agentbus.runtime.spans import SpanAttribute
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.adapters.otlp import basic_auth, encode_request, traces_url, unix_nanos
from agentbus.trace_exporter.domain import (
    REDACTED,
    LangfuseAttribute,
    Redactor,
    TraceDirectory,
    TraceIdentity,
    to_export_span,
)
from agentbus.trace_exporter.settings import DEFAULT_REDACT_PATTERNS, TraceExporterSettings
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from pydantic import ValidationError
from trace_otlp_receiver import plain

T0 = datetime(2026, 11, 3, 12, 0, 0, 123456, tzinfo=UTC)
REDACTOR = Redactor(DEFAULT_REDACT_PATTERNS, max_chars=100)


def _span(kind: SpanKind, attributes: dict[str, Any] | None = None, **fields: Any) -> SpanRecorded:
    trace = TraceContext.new()
    values: dict[str, Any] = {
        "trace_id": trace.trace_id,
        "span_id": trace.span_id,
        "name": kind,
        "kind": kind,
        "service": "agent-runner",
        "task_id": "task-1",
        "tenant": "acme",
        "start": T0,
        "end": T0 + timedelta(seconds=2),
        "attributes": attributes or {},
    }
    values.update(fields)
    return SpanRecorded(**values)


def test_every_span_carries_the_trace_fields_it_knows() -> None:
    span = _span("tool", {SpanAttribute.TOOL: "kubectl"})
    exported = to_export_span(span, TraceIdentity(agent="assistant", user="bob"), REDACTOR, environment="staging")
    attrs = exported.attributes
    assert attrs[LangfuseAttribute.TRACE_NAME] == "assistant"
    assert attrs[LangfuseAttribute.SESSION_ID] == attrs[LangfuseAttribute.LANGFUSE_SESSION_ID] == "task-1"
    assert attrs[LangfuseAttribute.USER_ID] == attrs[LangfuseAttribute.LANGFUSE_USER_ID] == "bob"
    assert attrs[LangfuseAttribute.TRACE_TAGS] == ["tenant:acme"]
    assert attrs[LangfuseAttribute.ENVIRONMENT] == "staging"
    assert attrs[LangfuseAttribute.OBSERVATION_TYPE] == "tool"
    assert attrs[SpanAttribute.TOOL] == "kubectl"


def test_a_span_without_a_known_agent_names_no_trace() -> None:
    exported = to_export_span(_span("retrieval", task_id=None, tenant=None), TraceIdentity(), REDACTOR)
    assert exported.attributes[LangfuseAttribute.OBSERVATION_TYPE] == "retriever"
    for absent in (LangfuseAttribute.TRACE_NAME, LangfuseAttribute.SESSION_ID, LangfuseAttribute.TRACE_TAGS):
        assert absent not in exported.attributes


@pytest.mark.parametrize(
    ("kind", "observation_type"),
    [
        ("task", "agent"),
        ("agent_step", "chain"),
        ("generation", "generation"),
        ("tool", "tool"),
        ("retrieval", "retriever"),
        ("approval_wait", "span"),
    ],
)
def test_each_kind_has_its_langfuse_observation_type(kind: SpanKind, observation_type: str) -> None:
    exported = to_export_span(_span(kind), TraceIdentity(), REDACTOR)
    assert exported.attributes[LangfuseAttribute.OBSERVATION_TYPE] == observation_type


def test_a_generation_carries_model_usage_and_cost() -> None:
    span = _span(
        "generation",
        {
            SpanAttribute.MODEL: "llama-3-8b",
            SpanAttribute.INPUT_TOKENS: 120,
            SpanAttribute.OUTPUT_TOKENS: 30,
            SpanAttribute.COST_USD: 0.0042,
            "gen_ai.request.temperature": 0.2,
        },
    )
    attrs = to_export_span(span, TraceIdentity(), REDACTOR).attributes
    assert attrs[LangfuseAttribute.MODEL] == attrs[SpanAttribute.MODEL] == "llama-3-8b"
    assert json.loads(str(attrs[LangfuseAttribute.USAGE_DETAILS])) == {"input": 120, "output": 30, "total": 150}
    assert (attrs[SpanAttribute.INPUT_TOKENS], attrs[SpanAttribute.OUTPUT_TOKENS]) == (120, 30)
    assert json.loads(str(attrs[LangfuseAttribute.COST_DETAILS])) == {"total": 0.0042}
    assert attrs["gen_ai.request.temperature"] == 0.2


def test_cost_is_optional_and_a_nonsense_cost_is_left_out() -> None:
    without = to_export_span(_span("generation", {SpanAttribute.INPUT_TOKENS: 5}), TraceIdentity(), REDACTOR)
    assert LangfuseAttribute.COST_DETAILS not in without.attributes
    negative = to_export_span(_span("generation", {SpanAttribute.COST_USD: -1}), TraceIdentity(), REDACTOR)
    assert LangfuseAttribute.COST_DETAILS not in negative.attributes
    legacy = to_export_span(_span("generation", {"cost_usd": "0.5"}), TraceIdentity(), REDACTOR)
    assert json.loads(str(legacy.attributes[LangfuseAttribute.COST_DETAILS])) == {"total": 0.5}


def test_inputs_and_outputs_are_redacted_and_truncated() -> None:
    secret = "sk-" + "a1b2c3d4" * 4
    span = _span(
        "generation",
        {
            SpanAttribute.INPUT: f"use key {secret} and Authorization: Bearer abcdefghijklmnop please",
            SpanAttribute.OUTPUT: "x" * 500,
            "tool_arguments": {"password": "hunter22", "path": "/etc"},
        },
    )
    attrs = to_export_span(span, TraceIdentity(), REDACTOR).attributes
    text = str(attrs[LangfuseAttribute.OBSERVATION_INPUT])
    assert secret not in text
    assert "abcdefghijklmnop" not in text
    assert text.count(REDACTED) == 2
    assert str(attrs[LangfuseAttribute.OBSERVATION_OUTPUT]) == "x" * 100 + "... [truncated 400 chars]"
    assert "hunter22" not in str(attrs["tool_arguments"])
    assert "/etc" in str(attrs["tool_arguments"])


def test_the_task_span_sets_the_trace_input_and_output() -> None:
    span = _span("task", {SpanAttribute.INPUT: "what is 2+2?", SpanAttribute.OUTPUT: "4"})
    attrs = to_export_span(span, TraceIdentity(agent="assistant"), REDACTOR).attributes
    assert attrs[LangfuseAttribute.TRACE_INPUT] == "what is 2+2?"
    assert attrs[LangfuseAttribute.TRACE_OUTPUT] == "4"
    step = to_export_span(_span("agent_step", {SpanAttribute.OUTPUT: "4"}), TraceIdentity(), REDACTOR)
    assert LangfuseAttribute.TRACE_OUTPUT not in step.attributes


def test_an_error_span_has_level_error_and_its_redacted_message() -> None:
    span = _span("tool", status="error", status_message="denied: token=abcd1234efgh")
    exported = to_export_span(span, TraceIdentity(), REDACTOR)
    assert exported.attributes[LangfuseAttribute.LEVEL] == "ERROR"
    assert exported.status_message == f"denied: {REDACTED}"


def test_the_directory_names_later_spans_of_a_trace_it_learned() -> None:
    directory = TraceDirectory(capacity=1)
    step = _span("agent_step", {SpanAttribute.AGENT: "assistant", SpanAttribute.USER: "bob"})
    generation = _span("generation", trace_id=step.trace_id)
    assert directory.learn(generation) == TraceIdentity()
    assert directory.learn(step) == TraceIdentity(agent="assistant", user="bob")
    assert directory.learn(generation) == TraceIdentity(agent="assistant", user="bob")
    directory.learn(_span("task", {SpanAttribute.AGENT: "other"}))  # capacity 1: the first trace is forgotten
    assert directory.learn(generation) == TraceIdentity()


def test_the_otlp_request_has_one_resource_per_service_and_exact_times() -> None:
    root = _span("task", {SpanAttribute.AGENT: "assistant"})
    child = _span(
        "generation",
        {SpanAttribute.INPUT_TOKENS: 3},
        trace_id=root.trace_id,
        parent_span_id=root.span_id,
        service="inference-worker",
        status="error",
        status_message="boom",
    )
    spans = [to_export_span(s, TraceIdentity(agent="assistant"), REDACTOR) for s in (root, child)]
    request = ExportTraceServiceRequest.FromString(encode_request(spans).SerializeToString())
    services = {
        plain(rs.resource.attributes[0].value): [s for ss in rs.scope_spans for s in ss.spans]
        for rs in request.resource_spans
    }
    assert set(services) == {"agent-runner", "inference-worker"}
    [task] = services["agent-runner"]
    [generation] = services["inference-worker"]
    assert task.trace_id.hex() == root.trace_id
    assert task.span_id.hex() == root.span_id
    assert task.parent_span_id == b""
    assert generation.parent_span_id.hex() == root.span_id
    assert task.start_time_unix_nano == 1_793_707_200_123_456_000
    assert task.end_time_unix_nano - task.start_time_unix_nano == 2_000_000_000
    assert generation.status.code == Status.STATUS_CODE_ERROR
    assert generation.status.message == "boom"
    attrs = {kv.key: plain(kv.value) for kv in generation.attributes}
    assert attrs[LangfuseAttribute.TRACE_TAGS] == ["tenant:acme"]
    assert attrs[SpanAttribute.INPUT_TOKENS] == 3
    assert request.resource_spans[0].scope_spans[0].scope.name == "agentbus"


def test_small_helpers() -> None:
    assert traces_url("http://lf:3000/api/public/otel/") == "http://lf:3000/api/public/otel/v1/traces"
    assert traces_url("http://lf:3000/api/public/otel/v1/traces") == "http://lf:3000/api/public/otel/v1/traces"
    assert basic_auth("pk-lf-1", "sk-lf-2") == "Basic cGstbGYtMTpzay1sZi0y"
    assert unix_nanos(datetime(1970, 1, 1, 0, 0, 1, 5)) == 1_000_005_000


def test_settings_refuse_a_bad_pattern_and_half_a_key_pair() -> None:
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        TraceExporterSettings(redact_patterns=["(unclosed"])
    with pytest.raises(ValidationError, match="both"):
        TraceExporterSettings(langfuse_public_key="pk-lf-1")


def test_settings_read_their_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_TRACES_OTLP_ENDPOINT", "http://langfuse:3000/api/public/otel")
    monkeypatch.setenv("AGENTBUS_TRACES_LANGFUSE_PUBLIC_KEY", "pk-lf-1")
    monkeypatch.setenv("AGENTBUS_TRACES_LANGFUSE_SECRET_KEY", "sk-lf-2")
    monkeypatch.setenv("AGENTBUS_TRACES_REDACT_PATTERNS", '["internal-[0-9]+"]')
    settings = TraceExporterSettings()
    assert settings.otlp_endpoint == "http://langfuse:3000/api/public/otel"
    assert settings.langfuse_secret_key is not None
    assert settings.langfuse_secret_key.get_secret_value() == "sk-lf-2"
    assert settings.redact_patterns == ["internal-[0-9]+"]
    assert "sk-lf-2" not in repr(settings)
