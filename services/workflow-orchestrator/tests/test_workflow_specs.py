"""Workflow files: the sample loads; a bad workflow stops start-up naming its file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from agentbus.workflow_orchestrator.specs import (
    WorkflowSpecError,
    load_agent_names,
    load_workflow_specs,
    parse_duration,
    resolve_input,
)
from agentbus.workflow_orchestrator.templates import Context, TemplateError, extract, parse_answer, render

REPO_ROOT = Path(__file__).resolve().parents[3]
AGENTS = {"research-agent", "analysis-agent", "writer-agent", "reviewer-agent", "echo"}


def _two_steps(**changes: Any) -> dict[str, Any]:
    workflow: dict[str, Any] = {
        "name": "pair",
        "input": [{"name": "topic", "type": "string", "required": True}],
        "steps": [
            {
                "name": "first",
                "agent": "echo",
                "input": {"topic": "{{ .input.topic }}"},
                "output": [{"name": "text", "path": ".result"}],
            },
            {
                "name": "second",
                "agent": "echo",
                "dependsOn": ["first"],
                "input": "Summarise {{ .steps.first.output.text }}",
                "output": [{"name": "summary", "path": ".result"}],
            },
        ],
        "output": {"summary": "{{ .steps.second.output.summary }}"},
    }
    workflow.update(changes)
    return workflow


def _load(tmp_path: Path, workflow: dict[str, Any]) -> None:
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(workflow), encoding="utf-8")
    load_workflow_specs(tmp_path, AGENTS)


def test_the_research_report_sample_loads_with_the_sample_agents() -> None:
    agents = load_agent_names(REPO_ROOT / "agents")
    specs = load_workflow_specs(REPO_ROOT / "workflows", agents)
    report = specs["research-report"]
    assert [s.name for s in report.steps] == [
        "research",
        "analyze-trends",
        "analyze-sentiment",
        "write-report",
        "review",
    ]
    assert report.step("write-report").depends_on == ["analyze-trends", "analyze-sentiment"]
    assert report.step("research").timeout == 300
    assert report.concurrency is not None
    assert report.concurrency.policy == "queue"
    assert report.timeout == 1800


def test_a_valid_two_step_workflow_loads(tmp_path: Path) -> None:
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(_two_steps()), encoding="utf-8")
    assert list(load_workflow_specs(tmp_path, AGENTS)) == ["pair"]


def _with_step(index: int, **changes: Any) -> dict[str, Any]:
    workflow = _two_steps()
    workflow["steps"][index].update(changes)
    return workflow


BAD = [
    pytest.param(
        _with_step(0, dependsOn=["second"]),
        "steps[1].dependsOn': the steps form a cycle: 'first' -> 'second' -> 'first'",
        id="cycle",
    ),
    pytest.param(
        _with_step(0, dependsOn=["first"]), "steps[0].dependsOn[0]': step 'first' depends on itself", id="self"
    ),
    pytest.param(_with_step(1, dependsOn=["frist"]), "steps[1].dependsOn[0]': unknown step 'frist'", id="unknown-step"),
    pytest.param(_with_step(1, agent="writer"), "steps[1].agent': unknown agent 'writer'", id="unknown-agent"),
    pytest.param(
        _with_step(1, dependsOn=[]),
        "steps[1].input': {{ .steps.first.output.text }}: step 'first' is not upstream of step 'second'",
        id="template-not-upstream",
    ),
    pytest.param(
        _with_step(1, input={"x": "{{ .steps.first.output.words }}"}),
        "steps[1].input.x': {{ .steps.first.output.words }}: step 'first' declares no output 'words'",
        id="template-unknown-output",
    ),
    pytest.param(
        _with_step(0, input={"x": "{{ .input.subject }}"}),
        "steps[0].input.x': {{ .input.subject }}: the workflow declares no input 'subject'",
        id="template-unknown-input",
    ),
    pytest.param(
        _with_step(0, input={"x": "{{ .env.HOME }}"}),
        "steps[0].input.x': {{ .env.HOME }} names neither .input.<name> nor .steps.<step>.output.<name>",
        id="template-unknown-root",
    ),
    pytest.param(
        _with_step(0, output=[{"name": "text", "path": ".output.data"}]),
        "steps[0].output[0].path': '.output.data' cannot exist: a step's result document has only .result",
        id="output-path-cannot-exist",
    ),
    pytest.param(
        _with_step(0, output=[{"name": "text", "path": "result data"}]),
        "steps[0].output[0].path': 'result data' is not a path",
        id="output-path-malformed",
    ),
    pytest.param(
        _two_steps(output={"x": "{{ .steps.third.output.y }}"}),
        "output.x': {{ .steps.third.output.y }}: there is no step 'third'",
        id="workflow-output-unknown-step",
    ),
    pytest.param(
        _two_steps(input=[{"name": "topic", "enum": ["a", "b"], "default": "c"}]),
        "input[0].default': 'c' is not one of ['a', 'b']",
        id="default-outside-enum",
    ),
    pytest.param(
        _two_steps(input=[{"name": "topic", "type": "integer", "default": "three"}]),
        "input[0].default': 'three' is not a integer",
        id="default-of-another-type",
    ),
    pytest.param(
        _with_step(0, parallel=True), "steps[0].parallel': Extra inputs are not permitted", id="unknown-field"
    ),
    pytest.param(_with_step(0, timeout="soon"), "steps[0].timeout'", id="bad-duration"),
    pytest.param(
        _two_steps(errorHandling={"onStepFailure": "ignore"}),
        "errorHandling.onStepFailure': Input should be 'retry', 'fail' or 'continue'",
        id="bad-policy",
    ),
    pytest.param(
        _two_steps(concurrency={"maxConcurrent": 0}),
        "concurrency.maxConcurrent': Input should be greater than or equal to 1",
        id="bad-limit",
    ),
]


@pytest.mark.parametrize(("workflow", "expected"), BAD)
def test_a_bad_workflow_is_refused_naming_its_file_and_field(
    tmp_path: Path, workflow: dict[str, Any], expected: str
) -> None:
    with pytest.raises(WorkflowSpecError) as refused:
        _load(tmp_path, workflow)
    assert str(refused.value).startswith(f"{tmp_path / 'pair.yaml'}: field '")
    assert expected in str(refused.value)


def test_a_workflow_named_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_two_steps()), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_two_steps()), encoding="utf-8")
    with pytest.raises(WorkflowSpecError, match=r"b.yaml: field 'name': workflow 'pair' is defined twice"):
        load_workflow_specs(tmp_path, AGENTS)


@pytest.mark.parametrize(
    ("written", "seconds"), [("300s", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), (90, 90)]
)
def test_durations_are_read_as_seconds(written: str | int, seconds: float) -> None:
    assert parse_duration(written) == seconds


def test_inputs_get_their_defaults_and_are_checked_against_type_and_enum(tmp_path: Path) -> None:
    specs = load_workflow_specs(REPO_ROOT / "workflows", load_agent_names(REPO_ROOT / "agents"))
    report = specs["research-report"]
    assert resolve_input(report, {"topic": "ai"}) == {"topic": "ai", "depth": "standard"}
    for given, problem in (
        ({}, "input 'topic' is required"),
        ({"topic": "ai", "depth": "shallow"}, "must be one of ['quick', 'standard', 'deep']"),
        ({"topic": 3}, "input 'topic' must be string"),
        ({"topic": "ai", "colour": "red"}, "unknown input 'colour'"),
    ):
        with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            resolve_input(report, given)


def test_templates_keep_values_whole_and_interpolate_text() -> None:
    context = Context({"topic": "ai"}, {"research": {"data": {"sources": ["web", "news"], "n": 2}}})
    rendered = render(
        {
            "whole": "{{ .steps.research.output.data }}",
            "deep": "{{ .steps.research.output.data.sources.1 }}",
            "text": "Topic {{ .input.topic }} from {{ .steps.research.output.data.sources }}",
            "literal": [1, "plain"],
        },
        context,
    )
    assert rendered == {
        "whole": {"sources": ["web", "news"], "n": 2},
        "deep": "news",
        "text": 'Topic ai from ["web", "news"]',
        "literal": [1, "plain"],
    }
    with pytest.raises(TemplateError, match=r"\.sources\.5 is not there"):
        render("{{ .steps.research.output.data.sources.5 }}", context)
    assert render({"x": "{{ .input.other }}"}, context, missing_as_null=True) == {"x": None}


def test_an_answer_is_read_as_json_when_it_holds_some() -> None:
    assert parse_answer('{"a": 1}') == {"a": 1}
    assert parse_answer('Here it is:\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_answer('[scripted offline engine, not an LLM] You asked: {"topic": "ai"} ok') == {"topic": "ai"}
    assert parse_answer("no json {here") == "no json {here"
    assert extract('{"document": {"title": "x"}}', ("result", "document", "title")) == "x"
    with pytest.raises(TemplateError, match=r"\.result\.document is not there"):
        extract("plain text", ("result", "document"))
