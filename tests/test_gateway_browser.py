"""The console in headless Chromium (Debian's `chromium`, driven by Playwright) against a real `agentbus up`:
an approval arrives in alice's inbox without a reload, she approves it and sees the task complete with its
answer; bob, who serves another tenant, never sees it; a refused decision shows why. On failure, a
screenshot of every open page is saved under AGENTBUS_TEST_ARTIFACTS (default .agentbus/test-artifacts/)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentbus.contracts.approvals import arguments_sha256
from agentbus.testing import skip_outside_ci
from gateway_support import HIGH_TICKET, Gateway, running_gateway
from helpers import REPO_ROOT
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("AGENTBUS_TEST_ARTIFACTS", REPO_ROOT / ".agentbus" / "test-artifacts"))
WAIT_MS = 45_000
TICKET_ARGUMENTS = {"title": "primary database down", "priority": "high"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        skip_outside_ci(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("console")) as running:
        yield running


class People:
    """One browser context per person logged in; every page of theirs is photographed if the test fails."""

    def __init__(self, browser: Browser, gateway: Gateway, artifacts: Path) -> None:
        self._browser = browser
        self._gateway = gateway
        self._artifacts = artifacts
        self._contexts: list[BrowserContext] = []

    def log_in(self, name: str, user: str) -> Page:
        context = self._browser.new_context(base_url=self._gateway.url)
        self._contexts.append(context)
        page = context.new_page()
        page.goto("/inbox")
        expect(page).to_have_url(re.compile(r"/login"))
        page.fill("input[name=name]", name)
        page.fill("input[name=password]", self._gateway.password(user))
        page.click("form.login button[type=submit]")
        expect(page.locator("#identity")).to_have_text(name)
        return page

    @contextlib.contextmanager
    def photographed_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._artifacts.mkdir(parents=True, exist_ok=True)
            for index, context in enumerate(self._contexts):
                for number, page in enumerate(context.pages):
                    with contextlib.suppress(Exception):
                        page.screenshot(path=str(self._artifacts / f"person{index}-page{number}.png"), full_page=True)
            raise

    def close(self) -> None:
        for context in self._contexts:
            context.close()


@pytest.fixture
def people(browser: Browser, gateway: Gateway, request: pytest.FixtureRequest) -> Iterator[People]:
    found = People(browser, gateway, ARTIFACTS / request.node.name)
    yield found
    found.close()


def _live_inbox(page: Page) -> None:
    page.goto("/inbox")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)


def _submit(gateway: Gateway, tenant: str, submitter: str) -> str:
    done = gateway.suite.run("submit", "--tenant", tenant, "--agent", "ops", "--as", submitter, HIGH_TICKET)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_alice_approves_a_ticket_that_arrives_live_and_sees_the_task_complete_while_bob_sees_none_of_it(
    gateway: Gateway, people: People
) -> None:
    with people.photographed_on_failure():
        _alice_approves_while_bob_sees_nothing(gateway, people)


def _alice_approves_while_bob_sees_nothing(gateway: Gateway, people: People) -> None:
    alice = people.log_in("alice", "approver-alice")
    bob = people.log_in("bob", "approver-bob")
    _live_inbox(alice)
    _live_inbox(bob)
    alice.evaluate("window.sameDocument = true")
    task_id = _submit(gateway, "acme", "acme-app")
    card = alice.locator(f'article.approval[data-task-id="{task_id}"]')
    expect(card).to_be_visible(timeout=WAIT_MS)
    assert alice.evaluate("window.sameDocument === true"), "the approval must arrive without a reload"
    expect(card.locator(".tool")).to_have_text("create_ticket")
    expect(card.locator(".risk")).to_have_text("high")
    expect(card.locator(".reason")).to_contain_text("High-priority tickets page the on-call engineer")
    expect(card.locator(".age")).to_contain_text("ago")
    expect(card.locator(".expires")).to_contain_text("in ")
    assert json.loads(card.locator("pre.arguments").inner_text()) == TICKET_ARGUMENTS
    sha = arguments_sha256(TICKET_ARGUMENTS)
    expect(card.locator(".sha")).to_have_text(sha)

    # bob serves globex: its ticket reaches him live, acme's never does.
    globex_task = _submit(gateway, "globex", "globex-app")
    expect(bob.locator(f'article.approval[data-task-id="{globex_task}"]')).to_be_visible(timeout=WAIT_MS)
    expect(bob.locator("article.approval")).to_have_count(1)
    expect(bob.locator(f'article.approval[data-task-id="{task_id}"]')).to_have_count(0)
    expect(alice.locator(f'article.approval[data-task-id="{globex_task}"]')).to_have_count(0)

    card.locator("input[name=reason]").fill("on call, agreed")
    card.locator("button.approve").click()
    expect(alice.locator("#verdict")).to_have_attribute("data-outcome", "accepted", timeout=WAIT_MS)
    expect(alice.locator("#decision-sha")).to_have_text(sha)
    alice.click("#follow-task")
    expect(alice.locator("li.kind-completed")).to_be_visible(timeout=WAIT_MS)
    expect(alice.locator("#task-status")).to_have_text("completed")
    expect(alice.locator("#answer")).to_contain_text("[scripted offline engine, not an LLM]")
    expect(alice.locator("#answer")).to_contain_text("create_ticket")
    expect(alice.locator("li.kind-approval_resolved")).to_contain_text("approved by alice")


def test_a_refused_decision_shows_its_reason(people: People) -> None:
    with people.photographed_on_failure():
        _own_approval_is_refused(people)


def _own_approval_is_refused(people: People) -> None:
    alice = people.log_in("alice", "submitter-alice")
    alice.goto("/tasks")
    alice.select_option("form.submit select[name=tenant]", "acme")
    alice.fill("form.submit input[name=agent]", "ops")
    alice.fill("form.submit textarea[name=input]", HIGH_TICKET)
    alice.click("form.submit button[type=submit]")
    # Her own task's page, live: it comes to wait for an approval.
    expect(alice.locator("li.kind-approval_pending")).to_be_visible(timeout=WAIT_MS)
    task_id = alice.url.rstrip("/").rsplit("/", 1)[1]
    _live_inbox(alice)
    card = alice.locator(f'article.approval[data-task-id="{task_id}"]')
    expect(card).to_be_visible(timeout=WAIT_MS)
    card.locator("button.approve").click()
    expect(alice.locator("#verdict")).to_have_attribute("data-outcome", "refused", timeout=WAIT_MS)
    # The tool forbids approving one's own call: the executor says so, and the approval still waits.
    expect(alice.locator("#verdict-reason")).to_have_text("self_approval")
    _live_inbox(alice)
    expect(card).to_be_visible()
