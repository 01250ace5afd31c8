"""Guardrail detectors on positive and negative examples, the actions, and the policies file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from agentbus.runtime.guardrails import (
    GuardrailCatalog,
    GuardrailCheck,
    GuardrailConfigError,
    GuardrailPolicy,
    Guardrails,
    find_personal_data,
    find_secrets,
    load_guardrails,
    luhn_valid,
)

ORDINARY_PARAGRAPH = (
    "Our quarterly review is on 2026-03-14 at 10:30 in room 4. Revenue grew 12.5% to 1,250,000 dollars "
    "across 3 regions; order 884213 shipped on time. Please reset your password if you forgot it, and keep "
    "the token you were given for the conference badge. See section 4.2.1 and RFC 9110, version 1.2.3."
)

SECRETS = {
    "aws_access_key": "key AKIAIOSFODNN7EXAMPLE in the config",
    "github_token": "use ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + " to push",
    "slack_token": "xoxb-" + "123456789012-abcdefABCDEF",
    "google_api_key": "AIza" + "SyA1234567890abcdefghijklmnopqrstuv",
    "stripe_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "openai_key": "OPENAI_API_KEY=sk-proj-" + "abcdefghijklmnopqrstuvwxyz012345",
    "jwt": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    + "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "assigned_secret": 'db_config = {"password": "Tr0ub4dor3x9zq"}',
}


@pytest.mark.parametrize(("kind", "text"), sorted(SECRETS.items()))
def test_each_kind_of_secret_is_found(kind: str, text: str) -> None:
    assert [span.kind for span in find_secrets(text)] == [kind]


def test_a_private_key_block_is_found_whole() -> None:
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----"
    text = f"here it is:\n{key}\nthanks"
    [span] = find_secrets(text)
    assert (span.kind, text[span.start : span.end]) == ("private_key", key)


def test_no_secret_and_no_personal_data_in_an_ordinary_paragraph() -> None:
    assert find_secrets(ORDINARY_PARAGRAPH) == []
    assert find_personal_data(ORDINARY_PARAGRAPH) == []


def test_a_password_in_prose_without_a_token_shaped_value_is_not_a_secret() -> None:
    assert find_secrets("the password: correcthorsebatterystaple is a famous example") == []


def test_personal_data_emails_phones_and_cards_with_a_luhn_check() -> None:
    text = "Mail jane.doe@example.co.uk or call +1 415-555-0132 / (020) 7946 0958; card 4111 1111 1111 1111."
    found = {(span.kind, text[span.start : span.end]) for span in find_personal_data(text)}
    assert found == {
        ("email", "jane.doe@example.co.uk"),
        ("phone", "+1 415-555-0132"),
        ("phone", "(020) 7946 0958"),
        ("card", "4111 1111 1111 1111"),
    }


def test_a_number_that_fails_luhn_is_not_a_card() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert find_personal_data("invoice 4111 1111 1111 1112", ["card"]) == []


def test_only_the_kinds_asked_for_are_found() -> None:
    text = "write to a@b.io, card 5500-0000-0000-0004"
    assert [span.kind for span in find_personal_data(text, ["card"])] == ["card"]
    assert [span.kind for span in find_personal_data(text, ["email"])] == ["email"]


def _guardrails(*checks: GuardrailCheck, name: str = "policy") -> Guardrails:
    return Guardrails([(name, GuardrailPolicy(checks=checks))])


def test_redact_masks_the_text_and_findings_never_carry_it() -> None:
    guardrails = _guardrails(GuardrailCheck(detector="personal_data", action="redact"))
    verdict = guardrails.check_text("output", "reach me at bob@example.com today")
    assert verdict.action == "redact"
    assert not verdict.blocked
    assert verdict.text == "reach me at [REDACTED:email] today"
    assert "bob@example.com" not in repr(verdict.findings)


def test_block_wins_over_approval_and_redaction_and_names_the_rule() -> None:
    guardrails = _guardrails(
        GuardrailCheck(detector="personal_data", action="redact"),
        GuardrailCheck(detector="deny_list", patterns=(r"(?i)\bdrop\s+table\b",), action="require_approval"),
        GuardrailCheck(detector="secrets", action="block", name="no-keys"),
        name="strict",
    )
    verdict = guardrails.check_text("input", "x@y.org: DROP TABLE users; key AKIAIOSFODNN7EXAMPLE")
    assert verdict.blocked
    assert verdict.reason() == "guardrail strict/no-keys: aws_access_key (input)"
    assert {finding.action for finding in verdict.findings} == {"redact", "require_approval", "block"}


def test_require_approval_gives_its_finding_as_the_reason() -> None:
    guardrails = _guardrails(GuardrailCheck(detector="deny_list", patterns=(r"rm -rf",), action="require_approval"))
    verdict = guardrails.check_text("tool_arguments", "please rm -rf /tmp/cache")
    assert verdict.needs_approval
    assert verdict.reason() == "guardrail policy/deny_list: pattern 0 (tool_arguments)"


def test_max_length_blocks_past_the_limit_only() -> None:
    guardrails = _guardrails(GuardrailCheck(detector="max_length", max_chars=10, action="block"))
    assert guardrails.check_text("input", "0123456789").action is None
    assert guardrails.check_text("input", "0123456789x").blocked


def test_a_check_applies_only_to_its_stages() -> None:
    guardrails = _guardrails(GuardrailCheck(detector="personal_data", action="block", stages=("output",)))
    assert guardrails.check_text("input", "a@b.io").action is None
    assert guardrails.check_text("output", "a@b.io").blocked


def test_tool_arguments_are_checked_in_every_nested_string_and_redacted_in_place() -> None:
    guardrails = _guardrails(GuardrailCheck(detector="personal_data", kinds=("email",), action="redact"))
    verdict = guardrails.check_arguments({"to": ["ops@acme.io", "x"], "meta": {"cc": "a@b.io"}, "n": 3})
    assert verdict.arguments == {"to": ["[REDACTED:email]", "x"], "meta": {"cc": "[REDACTED:email]"}, "n": 3}
    assert sorted(finding.field or "" for finding in verdict.findings) == ["meta.cc", "to[0]"]


def test_the_policies_file_loads_and_agents_name_known_policies(tmp_path: Path) -> None:
    path = tmp_path / "guardrails.yaml"
    path.write_text(
        "policies:\n"
        "  no-secrets:\n"
        "    checks:\n"
        "      - {detector: secrets, action: block}\n"
        "  privacy:\n"
        "    checks:\n"
        "      - {detector: personal_data, kinds: [email], action: redact, stages: [output]}\n"
    )
    catalog = load_guardrails(path)
    assert sorted(catalog.policies) == ["no-secrets", "privacy"]
    assert catalog.for_agent(["privacy"], agent="support").check_text("output", "a@b.io").text == "[REDACTED:email]"
    with pytest.raises(GuardrailConfigError, match=r"agent 'support': field 'guardrails': no policy 'nope'"):
        catalog.for_agent(["nope"], agent="support")


def test_a_missing_file_means_no_policies(tmp_path: Path) -> None:
    catalog = load_guardrails(tmp_path / "absent.yaml")
    assert catalog.policies == {}
    assert not catalog.for_agent([], agent="a")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "policies:\n  p:\n    checks:\n      - {detector: dns, action: block}\n",
            "field 'policies.p.checks\\[0\\].detector'",
        ),
        (
            "policies:\n  p:\n    checks:\n      - {detector: deny_list, patterns: ['(unclosed'], action: block}\n",
            "field 'policies.p.checks\\[0\\].patterns': .*not a valid regular expression",
        ),
        ("policies:\n  p:\n    checks:\n      - {detector: max_length, action: block}\n", "needs 'max_chars'"),
        ("policies:\n  p:\n    checks: []\n", "field 'policies.p.checks'"),
        ("policies:\n  'bad name':\n    checks:\n      - {detector: secrets, action: block}\n", "policy name"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "guardrails.yaml"
    path.write_text(text)
    with pytest.raises(GuardrailConfigError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_guardrails(path)


def test_an_empty_catalog_is_usable() -> None:
    assert GuardrailCatalog({}).for_agent([], agent="a").check_text("input", "anything").action is None


def test_mask_blocked_masks_what_a_block_finding_matched_and_keeps_redact_only_by_default() -> None:
    guardrails = Guardrails([("p", GuardrailPolicy(checks=(GuardrailCheck(detector="secrets", action="block"),)))])
    text = "key AKIA" + "IOSFODNN7EXAMPLE here"
    assert guardrails.check_text("input", text).text == text
    assert guardrails.check_text("input", text, mask_blocked=True).text == "key [REDACTED:aws_access_key] here"
    masked = guardrails.check_arguments({"env": {"KEY": text}}, mask_blocked=True).arguments
    assert masked == {"env": {"KEY": "key [REDACTED:aws_access_key] here"}}
    [finding] = guardrails.check_text("input", text).findings
    assert (finding.detector, finding.check) == ("secrets", "secrets")


def _model_check(**fields: object) -> GuardrailCheck:
    return GuardrailCheck.model_validate(
        {"detector": "model", "action": "block", "model": "judge", "instructions": "No insults.", **fields}
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model": None}, "needs 'model' and 'instructions'"),
        ({"action": "redact"}, "not redact"),
        ({"stages": ["tool_arguments"]}, "not tool arguments"),
        ({"detector": "secrets"}, "are for model checks"),
    ],
)
def test_a_model_check_needs_a_model_and_instructions_and_cannot_redact(
    fields: dict[str, object], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        _model_check(**fields)


def test_a_model_check_is_asked_of_its_classifier_and_its_answer_becomes_a_finding() -> None:
    check = _model_check(name="civility", stages=["input", "output"])
    guardrails = Guardrails([("tone", GuardrailPolicy(checks=(check,)))])
    assert guardrails.check_text("input", "you fool").findings == ()  # no pattern: only its classifier judges
    [asked] = guardrails.model_checks("input")
    assert (asked.policy, asked.check, asked.model, asked.action) == ("tone", "civility", "judge", "block")
    assert "No insults." in asked.prompt()
    assert asked.finding("input", "SAFE", "hello") is None
    flagged = asked.finding("input", "FLAG: Personal insult", "you fool")
    assert flagged is not None
    assert (flagged.kind, flagged.detector, flagged.start, flagged.end) == ("model:personal_insult", "model", 0, 8)
    unanswered = asked.finding("input", None, "you fool")
    assert unanswered is not None
    assert unanswered.kind == "classifier_unavailable"
    assert guardrails.model_checks("tool_arguments") == []
    assert _model_check().stages == ("input", "output")
