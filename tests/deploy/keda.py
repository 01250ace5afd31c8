"""KEDA's nats-jetstream scaling arithmetic, and the ScaledObjects an overlay renders.

For tests that drive a real nats-server and check what KEDA would do with its numbers:

    from deploy.keda import keda_replicas, rendered_scaled_objects, scaled_object_replicas
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from deploy.manifests import of_kind, render_overlay


def keda_replicas(lag: int, lag_threshold: int, min_replicas: int, max_replicas: int, activation: int) -> int:
    """The replica count KEDA settles on for one nats-jetstream trigger.

    `lag` is what the scaler reads from /jsz: the consumer's num_pending + num_ack_pending. KEDA reports it
    to the HPA as an AverageValue metric with target `lag_threshold`, so the HPA wants
    ceil(lag / lag_threshold) replicas, kept within min..max. Scaling from and to zero is KEDA's own: with
    `min_replicas` 0 the workload is at zero while lag <= `activation` (activationLagThreshold), and at
    least one replica once it is above. The steady state only: the HPA's 10% tolerance and its
    stabilisation windows shape how fast this number is reached, not the number.
    """
    if lag < 0 or activation < 0:
        raise ValueError("lag and activation cannot be negative")
    if lag_threshold < 1:
        raise ValueError("lagThreshold must be at least 1")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
    if min_replicas == 0 and lag <= activation:
        return 0
    desired = math.ceil(lag / lag_threshold)
    return max(min_replicas, 1, min(max_replicas, desired))


def scaled_object_replicas(scaled_object: Mapping[str, Any], lag_by_consumer: Mapping[str, int]) -> int:
    """Replicas for a whole ScaledObject: KEDA takes the highest of its triggers.

    `lag_by_consumer` maps each trigger's consumer (durable name) to its lag; a consumer left out counts
    as lag 0.
    """
    spec = scaled_object["spec"]
    min_replicas = int(spec.get("minReplicaCount", 0))
    max_replicas = int(spec.get("maxReplicaCount", 100))
    return max(
        keda_replicas(
            lag=lag_by_consumer.get(trigger["metadata"]["consumer"], 0),
            lag_threshold=int(trigger["metadata"].get("lagThreshold", 10)),
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            activation=int(trigger["metadata"].get("activationLagThreshold", 0)),
        )
        for trigger in spec["triggers"]
        if trigger["type"] == "nats-jetstream"
    )


def rendered_scaled_objects(overlay: str) -> list[dict[str, Any]]:
    """The ScaledObjects of an overlay (`dev`, `staging`, `prod`, or a kustomization folder), rendered."""
    return copy.deepcopy(of_kind(render_overlay(overlay), "ScaledObject"))
