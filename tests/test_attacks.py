"""The attack suite (`make attack`): every case of tests/attacks.py against the whole suite, identities enforced.

It ends by printing `attacks: N tried, N refused, 0 breaches`.
"""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from agentbus.cli.suite import Suite
from attacks import ATTACKS, IDENTITIES_YAML, Arena, Attack, NotRefusedError, close_arena, open_arena
from helpers import AGENTS_DIR, REPO_ROOT

OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    state_dir = tmp_path_factory.mktemp("attacked")
    (state_dir / "identities.yaml").write_text(IDENTITIES_YAML)
    suite = Suite(
        state_dir,
        AGENTS_DIR,
        enforce_identities=True,
        config_dir=REPO_ROOT / "config",
        tools_dir=REPO_ROOT / "tools",
        echo=io.StringIO(),  # the suite's progress lines are not the test's output
    )
    try:
        suite.start(ready_timeout=90)
        yield suite
    finally:
        suite.stop()
        tried = len(OUTCOMES)
        refused = sum(1 for outcome in OUTCOMES.values() if outcome == "refused")
        breaches = sum(1 for outcome in OUTCOMES.values() if outcome == "breach")
        print(f"\nattacks: {tried} tried, {refused} refused, {breaches} breaches", file=sys.stderr)


@pytest_asyncio.fixture(scope="module")
async def arena(attacked: Suite) -> AsyncIterator[Arena]:
    opened = await open_arena(attacked)
    try:
        yield opened
    finally:
        await close_arena(opened)


@pytest.mark.parametrize("case", ATTACKS, ids=[f"{a.refused_by}-{a.name}" for a in ATTACKS])
async def test_the_attack_is_refused(arena: Arena, case: Attack) -> None:
    try:
        await case.run(arena)
    except NotRefusedError:
        OUTCOMES[case.name] = "breach"
        raise
    except BaseException:
        OUTCOMES[case.name] = "error"
        raise
    OUTCOMES[case.name] = "refused"


def test_the_suite_tries_every_class_of_attack() -> None:
    assert len(ATTACKS) >= 80
    assert {a.refused_by for a in ATTACKS} == {"server", "executor", "runner"}
    assert len({a.name for a in ATTACKS}) == len(ATTACKS)
