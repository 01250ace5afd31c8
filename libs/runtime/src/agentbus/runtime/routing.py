"""Model routing over subjects: weighted deployments, pinning and fallback, from a YAML routing table.

An agent names a *logical* model (`assistant-llm`). The routing table maps it to one or more
*deployments*, each a model subject token (`agentbus.llm.requests.<deployment>`) served by its own
workers, with a weight: a canary takes its weight's share of requests. A request may pin a deployment
(the runner reads the pin from a task metadata key, the way a gateway reads a routing header), and a
logical model may name a fallback model used when its step ends in an error or a timeout.

The choice is a pure function of the model, the request id and the table: a redelivered step picks the
same deployment, in any process, with no shared state. A model absent from the table routes to itself.

File format (`config/models.yaml`)::

    pin_metadata_key: model_deployment    # optional; the task metadata key that pins a deployment
    models:
      assistant-llm:                       # the logical model agents name
        deployments:
          - {model: llama-3-8b, weight: 90}
          - {model: llama-3-8b-canary, weight: 10}
        fallback: scripted                 # optional; a logical model or a plain subject token
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from agentbus.contracts.common import Identifier
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import validated
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PIN_METADATA_KEY = "model_deployment"
"""The task metadata key whose value pins a deployment, unless the table names another."""

__all__ = [
    "DEFAULT_PIN_METADATA_KEY",
    "Deployment",
    "ModelRoute",
    "RoutingConfigError",
    "RoutingTable",
    "load_routing_table",
]


class RoutingConfigError(ConfigurationError):
    """The routing table is invalid. The message names the file and the field."""


class Deployment(BaseModel):
    """One place a logical model is served: a model subject token and its share of traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Identifier = Field(description="Subject token of the deployment: agentbus.llm.requests.<model>.")
    weight: int = Field(
        default=1, ge=0, le=1_000_000, description="Relative share of requests; 0 takes only pinned requests."
    )


class ModelRoute(BaseModel):
    """How one logical model is routed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployments: list[Deployment] = Field(min_length=1, description="Where requests for the model go.")
    fallback: Identifier | None = Field(
        default=None, description="Model to use when a step of this model ends in an error or a timeout."
    )

    @model_validator(mode="after")
    def _check_deployments(self) -> ModelRoute:
        names = [d.model for d in self.deployments]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment {duplicates[0]!r} is listed twice")
        if not any(d.weight > 0 for d in self.deployments):
            raise ValueError("at least one deployment needs a weight above 0")
        return self


class _RoutingFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pin_metadata_key: str = Field(default=DEFAULT_PIN_METADATA_KEY, min_length=1)
    models: dict[Identifier, ModelRoute] = Field(default_factory=dict)


def _unit_interval(*parts: str) -> float:
    """A uniform number in (0, 1) from a stable hash: the same in every process and on every run."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    # 53 bits fill a double's mantissa; +0.5 keeps the value strictly inside (0, 1) for the logarithm.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53) + 0.5 / float(1 << 53)


@dataclass(frozen=True, eq=False)
class RoutingTable:
    """Logical models, their weighted deployments and fallbacks. Immutable; build it with
    `load_routing_table` or `RoutingTable.from_mapping`."""

    routes: Mapping[str, ModelRoute]
    pin_metadata_key: str = DEFAULT_PIN_METADATA_KEY

    def __post_init__(self) -> None:
        for model in self.routes:
            self._check_fallback_chain(model)

    @classmethod
    def empty(cls) -> RoutingTable:
        """A table with no routes: every model routes to itself and has no fallback."""
        return cls({})

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "routing table") -> RoutingTable:
        """Validate a parsed routing file. Raises RoutingConfigError naming `source` and the field."""
        parsed = validated(_RoutingFile, raw, source, RoutingConfigError)
        try:
            return cls(dict(parsed.models), parsed.pin_metadata_key)
        except RoutingConfigError as exc:
            raise RoutingConfigError(f"{source}: {exc}") from exc

    def choose(self, model: str, request_id: str, pinned: str | None = None) -> str:
        """The deployment (model subject token) to publish this request on.

        `pinned` names a deployment of `model` to use regardless of weights (even a weight-0 one); a pin
        that names no deployment of `model` is ignored, so task metadata cannot steer a request to an
        arbitrary model's subject. Otherwise the choice is weighted and deterministic on `request_id`.
        """
        route = self.routes.get(model)
        if route is None:
            return model
        if pinned is not None and any(d.model == pinned for d in route.deployments):
            return pinned
        # Weighted rendezvous hashing: each deployment scores -weight / ln(u) with u uniform from a hash
        # of (model, deployment, request id); the top score wins with probability weight / total. Unlike
        # cutting one hash into weight intervals, changing one deployment's weight or adding a canary
        # only moves requests to or from that deployment.
        best, best_score = route.deployments[0].model, -1.0
        for deployment in route.deployments:
            if deployment.weight == 0:
                continue
            score = -deployment.weight / math.log(_unit_interval(model, deployment.model, request_id))
            if score > best_score:
                best, best_score = deployment.model, score
        return best

    def fallback(self, model: str) -> str | None:
        """The model to retry a failed step of logical `model` on, or None. Fallback chains never loop."""
        route = self.routes.get(model)
        return route.fallback if route is not None else None

    def fallback_chain(self, model: str) -> tuple[str, ...]:
        """Every model tried after `model`, in order: its fallback, that one's fallback, and so on."""
        chain: list[str] = []
        current = self.fallback(model)
        while current is not None:
            chain.append(current)
            current = self.fallback(current)
        return tuple(chain)

    def pinned_deployment(self, metadata: Mapping[str, Any]) -> str | None:
        """The deployment a task's metadata pins (the value of `pin_metadata_key`), if it is a string."""
        value = metadata.get(self.pin_metadata_key)
        return value if isinstance(value, str) and value else None

    def deployments(self, model: str) -> tuple[str, ...]:
        """The subject tokens a logical model's requests may go to (itself when it has no route)."""
        route = self.routes.get(model)
        return tuple(d.model for d in route.deployments) if route is not None else (model,)

    def served_models(self) -> tuple[str, ...]:
        """Every model subject token the table can route to, sorted: each deployment, and each fallback
        that is not itself a logical model. Workers must serve these (and the bootstrap declare their
        consumers), or requests routed there wait unserved."""
        tokens: set[str] = set()
        for route in self.routes.values():
            tokens.update(d.model for d in route.deployments)
            if route.fallback is not None and route.fallback not in self.routes:
                tokens.add(route.fallback)
        return tuple(sorted(tokens))

    def _check_fallback_chain(self, model: str) -> None:
        seen = [model]
        current = self.fallback(model)
        while current is not None:
            if current in seen:
                cycle = " -> ".join([*seen[seen.index(current) :], current])
                raise RoutingConfigError(f"field 'models.{model}.fallback': fallback loop {cycle}")
            seen.append(current)
            current = self.fallback(current)


def load_routing_table(path: Path) -> RoutingTable:
    """Read and validate a routing table file. Raises RoutingConfigError naming the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutingConfigError(f"{path}: cannot read the routing table: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RoutingConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        return RoutingTable.empty()
    if not isinstance(raw, dict):
        raise RoutingConfigError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    return RoutingTable.from_mapping(raw, source=str(path))
