"""Where the CLI finds NATS: --nats-url, then $AGENTBUS_NATS_URL, then ./.agentbus/env, then the default."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = Path(".agentbus")
ENV_FILE_NAME = "env"
NATS_URL_VARIABLE = "AGENTBUS_NATS_URL"
NATS_MONITOR_URL_VARIABLE = "AGENTBUS_NATS_MONITOR_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def read_env_file(state_dir: Path = STATE_DIR) -> dict[str, str]:
    """The KEY=VALUE lines `agentbus up` wrote, or nothing when it has not run here."""
    path = state_dir / ENV_FILE_NAME
    if not path.exists():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            values[key.strip()] = value.strip()
    return values


def write_env_file(values: dict[str, str], state_dir: Path = STATE_DIR) -> Path:
    """Write KEY=VALUE lines for every other command to read."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / ENV_FILE_NAME
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    return path


def resolve_nats_url(explicit: str | None, state_dir: Path = STATE_DIR) -> str:
    if explicit:
        return explicit
    if os.environ.get(NATS_URL_VARIABLE):
        return os.environ[NATS_URL_VARIABLE]
    return read_env_file(state_dir).get(NATS_URL_VARIABLE, DEFAULT_NATS_URL)
