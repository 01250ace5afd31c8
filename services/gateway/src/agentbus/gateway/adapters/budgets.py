"""The budgets file the cost-accountant enforces, read for the limits the cost page draws."""

from __future__ import annotations

from pathlib import Path

import yaml
from agentbus.gateway.domain import Budgets
from agentbus.runtime.errors import ConfigurationError
from pydantic import ValidationError


def load_budgets(path: Path | None) -> Budgets:
    """The budgets of `path`; none when no file is configured. ConfigurationError when it is unreadable."""
    if path is None:
        return Budgets()
    try:
        return Budgets.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"budgets file {path}: {exc}") from exc
