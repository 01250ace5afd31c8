"""KEDA's nats-jetstream arithmetic, as tests of other suites use it."""

from __future__ import annotations

import pytest
from deploy.keda import keda_replicas, rendered_scaled_objects, scaled_object_replicas


@pytest.mark.parametrize(
    ("lag", "threshold", "min_replicas", "max_replicas", "activation", "expected"),
    [
        (0, 64, 0, 10, 0, 0),  # idle, may scale to zero
        (1, 64, 0, 10, 0, 1),  # the first message wakes one replica
        (5, 64, 0, 10, 5, 0),  # at the activation threshold: still asleep
        (6, 64, 0, 10, 5, 1),
        (64, 64, 0, 10, 0, 1),  # exactly one replica's worth
        (65, 64, 0, 10, 0, 2),  # ceil, not round
        (640, 64, 1, 10, 0, 10),
        (10_000, 64, 1, 10, 0, 10),  # capped at max
        (0, 64, 3, 15, 0, 3),  # floor holds with no work
        (100, 64, 3, 15, 1000, 3),  # activation only matters when min is 0
    ],
)
def test_replicas_follow_lag_over_threshold_within_bounds(
    lag: int, threshold: int, min_replicas: int, max_replicas: int, activation: int, expected: int
) -> None:
    assert keda_replicas(lag, threshold, min_replicas, max_replicas, activation) == expected


@pytest.mark.parametrize(
    ("lag", "threshold", "min_replicas", "max_replicas", "activation"),
    [(-1, 10, 0, 1, 0), (1, 0, 0, 1, 0), (1, 10, 2, 1, 0), (1, 10, 0, 0, 0), (1, 10, 0, 1, -1)],
)
def test_nonsense_parameters_are_refused(
    lag: int, threshold: int, min_replicas: int, max_replicas: int, activation: int
) -> None:
    with pytest.raises(ValueError):
        keda_replicas(lag, threshold, min_replicas, max_replicas, activation)


def test_a_scaled_object_follows_its_busiest_trigger() -> None:
    runner = next(so for so in rendered_scaled_objects("prod") if so["metadata"]["name"] == "agent-runner")
    threshold = int(runner["spec"]["triggers"][0]["metadata"]["lagThreshold"])

    assert scaled_object_replicas(runner, {}) == runner["spec"]["minReplicaCount"]
    busy = {"agent-runner-submissions": threshold * 5, "agent-runner-llm-results": threshold * 7}
    assert scaled_object_replicas(runner, busy) == 7
    assert scaled_object_replicas(runner, {"agent-runner-llm-results": 10**9}) == runner["spec"]["maxReplicaCount"]
