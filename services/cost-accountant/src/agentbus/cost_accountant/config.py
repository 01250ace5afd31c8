"""Loading the price table and the budgets from YAML. A bad file stops start-up, naming the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from agentbus.cost_accountant.budgets import BudgetConfig
from agentbus.cost_accountant.limits import LimitsConfig
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.runtime.errors import ConfigurationError
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _field_path(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def _load(path: Path, model: type[ConfigT]) -> ConfigT:
    if not path.is_file():
        raise ConfigurationError(f"{path}: file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: expected a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigurationError(f"{path}: field '{_field_path(first['loc'])}': {first['msg']}") from exc


def load_price_table(path: Path) -> PriceTable:
    """The price table in `path`."""
    return _load(path, PriceTable)


def load_budget_config(path: Path) -> BudgetConfig:
    """The budgets in `path`."""
    return _load(path, BudgetConfig)


def load_limits_config(path: Path) -> LimitsConfig:
    """The rate limits in `path`."""
    return _load(path, LimitsConfig)
