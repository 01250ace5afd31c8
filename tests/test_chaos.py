"""A short chaos run inside `make test`: fewer tasks and faults than `make chaos`, the same invariants."""

from __future__ import annotations

import random

import pytest
from chaos import INVARIANTS, run_once


@pytest.mark.timeout(600)
async def test_a_short_chaos_run_loses_nothing_repeats_nothing_and_leaks_nothing() -> None:
    seed = random.SystemRandom().randrange(1_000_000)
    result = await run_once(40, 10, seed, outage_seconds=6.0, settle_timeout=240.0, log=lambda line: None)
    print(result.line())
    assert result.faults >= 8, "the faults were injected"
    assert all(result.verdict.counts[name] == 0 for name in INVARIANTS), (result.line(), result.verdict.details)
