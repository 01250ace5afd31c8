"""The price table and how usage is priced: tokens per model, GPU-seconds per node class, calls per tool.

A model, node class or tool missing from the table is priced by the table's declared default rule for its
kind, and the result is flagged `priced_by_default`. Without a default rule it cannot be priced: that is a
`PricingError`, and the usage record goes to the dead-letter stream with the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

from agentbus.contracts.budget import BudgetErrorCode
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.domain import usd_to_nano
from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS_PER_RECORD = 10_000_000_000
MAX_GPU_SECONDS_PER_RECORD = 10_000_000.0
RETRIEVAL_TOOL = "retrieval"
"""The tool a retrieval record without a `tool` is priced as."""


class PricingError(Exception):
    """A usage record or reservation that cannot be priced. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_million: Decimal = Field(ge=0, le=1_000_000, description="USD per million prompt tokens.")
    completion_per_million: Decimal = Field(ge=0, le=1_000_000, description="USD per million completion tokens.")


class NodeClassPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_gpu_hour: Decimal = Field(ge=0, le=1_000_000, description="USD per GPU-hour on this node class.")


class ToolPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_call: Decimal = Field(ge=0, le=1_000_000, description="USD per call.")


class PriceTable(BaseModel):
    """config/prices.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelPrice] = Field(default_factory=dict)
    default_model: ModelPrice | None = Field(default=None, description="Prices models not listed (flagged).")
    node_classes: dict[str, NodeClassPrice] = Field(default_factory=dict)
    default_node_class: NodeClassPrice | None = None
    tools: dict[str, ToolPrice] = Field(default_factory=dict)
    default_tool: ToolPrice | None = None

    def model_price(self, model: str) -> tuple[ModelPrice, bool]:
        """The model's price and whether the default rule gave it."""
        if model in self.models:
            return self.models[model], False
        if self.default_model is not None:
            return self.default_model, True
        raise PricingError("unknown_model", f"model {model!r} has no price and the table declares no default_model")

    def node_class_price(self, node_class: str) -> tuple[NodeClassPrice, bool]:
        if node_class in self.node_classes:
            return self.node_classes[node_class], False
        if self.default_node_class is not None:
            return self.default_node_class, True
        raise PricingError(
            "unknown_node_class",
            f"node class {node_class!r} has no price and the table declares no default_node_class",
        )

    def tool_price(self, tool: str) -> tuple[ToolPrice, bool]:
        if tool in self.tools:
            return self.tools[tool], False
        if self.default_tool is not None:
            return self.default_tool, True
        raise PricingError("unknown_tool", f"tool {tool!r} has no price and the table declares no default_tool")


@dataclass(frozen=True)
class Price:
    """A priced amount and whether any part of it came from a default rule."""

    nano: int
    priced_by_default: bool


def _token_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> Decimal:
    return (price.prompt_per_million * prompt_tokens + price.completion_per_million * completion_tokens) / 1_000_000


@functools.lru_cache(maxsize=1024)
def _whole_nano_per_token(prompt_per_million: Decimal, completion_per_million: Decimal) -> tuple[int, int] | None:
    """Per-token prices in whole nano-dollars, when both are (a price per million with at most three decimals,
    as every price is in practice): then tokens are priced in integers, exactly as the Decimal sum rounds."""
    prompt, completion = prompt_per_million * 1000, completion_per_million * 1000
    if prompt != prompt.to_integral_value() or completion != completion.to_integral_value():
        return None
    return int(prompt), int(completion)


def price_tokens(table: PriceTable, model: str, prompt_tokens: int, completion_tokens: int) -> Price:
    """What `prompt_tokens` and `completion_tokens` on `model` cost."""
    price, by_default = table.model_price(model)
    whole = _whole_nano_per_token(price.prompt_per_million, price.completion_per_million)
    if whole is not None:  # every reservation is priced here: integers are much cheaper than Decimals
        return Price(prompt_tokens * whole[0] + completion_tokens * whole[1], by_default)
    return Price(usd_to_nano(_token_cost(price, prompt_tokens, completion_tokens)), by_default)


def price_tool_call(table: PriceTable, tool: str) -> Price:
    price, by_default = table.tool_price(tool)
    return Price(usd_to_nano(price.per_call), by_default)


def _check_quantities(usage: UsageRecorded) -> None:
    if usage.prompt_tokens > MAX_TOKENS_PER_RECORD:
        raise PricingError(
            "implausible_quantity", f"prompt_tokens={usage.prompt_tokens} is more than one record can hold"
        )
    if usage.completion_tokens > MAX_TOKENS_PER_RECORD:
        raise PricingError(
            "implausible_quantity", f"completion_tokens={usage.completion_tokens} is more than one record can hold"
        )
    if usage.gpu_seconds > MAX_GPU_SECONDS_PER_RECORD:
        raise PricingError("implausible_quantity", f"gpu_seconds={usage.gpu_seconds} is more than one record can hold")


def price_usage(table: PriceTable, usage: UsageRecorded) -> Price:
    """The cost of one usage record.

    llm: tokens by the model, plus GPU-seconds by node class when a self-hosted engine reports them (so a
    self-hosted model does not show $0). gpu: GPU-seconds by node class. tool: the tool's per-call price.
    retrieval: the per-call price of its tool, or of the tool named `retrieval`.
    """
    _check_quantities(usage)
    total = Decimal(0)
    by_default = False
    whole_nano = 0
    if usage.kind == "llm":
        if not usage.model:
            raise PricingError(BudgetErrorCode.MISSING_MODEL, "an llm usage record must name its model")
        model_price, by_default = table.model_price(usage.model)
        whole = _whole_nano_per_token(model_price.prompt_per_million, model_price.completion_per_million)
        if whole is not None:  # exact in integers; every record is priced here
            whole_nano = usage.prompt_tokens * whole[0] + usage.completion_tokens * whole[1]
        else:
            total += _token_cost(model_price, usage.prompt_tokens, usage.completion_tokens)
    if usage.kind in ("llm", "gpu") and (usage.gpu_seconds > 0 or usage.kind == "gpu"):
        if not usage.node_class:
            raise PricingError("missing_node_class", "GPU-seconds must name the node class they ran on")
        node_price, node_default = table.node_class_price(usage.node_class)
        by_default = by_default or node_default
        total += node_price.per_gpu_hour * Decimal(str(usage.gpu_seconds)) / 3600
    if usage.kind in ("tool", "retrieval"):
        tool = usage.tool or (RETRIEVAL_TOOL if usage.kind == "retrieval" else None)
        if tool is None:
            raise PricingError(BudgetErrorCode.MISSING_TOOL, "a tool usage record must name its tool")
        tool_price, by_default = table.tool_price(tool)
        total += tool_price.per_call
    return Price(whole_nano + (usd_to_nano(total) if total else 0), by_default)
