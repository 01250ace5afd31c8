"""JSON Schemas of every message type, as committed under `contracts/schemas/`.

`python -m agentbus.contracts.schemas DIR` rewrites them; a test fails when the committed files drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agentbus.contracts import registry
from agentbus.contracts.tasks import TaskEvent
from pydantic import TypeAdapter


def message_schemas() -> dict[str, dict[str, Any]]:
    """Schema of each message type, keyed by its name: every registry subject's type and TaskEvent."""
    schemas: dict[str, dict[str, Any]] = {}
    for subject in registry.SUBJECTS:
        for message in (subject.message, subject.reply):
            if message is not None:
                schemas[message.__name__] = message.model_json_schema(mode="serialization")
    schemas["TaskEvent"] = TypeAdapter(TaskEvent).json_schema(mode="serialization")
    return dict(sorted(schemas.items()))


def render(schema: dict[str, Any]) -> str:
    """The exact text committed for a schema: stable key order, two-space indent, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema as `<Name>.json` into `directory`, removing files of types that no longer exist."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    schemas = message_schemas()
    for stale in directory.glob("*.json"):
        if stale.stem not in schemas:
            stale.unlink()
    for name, schema in schemas.items():
        path = directory / f"{name}.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("contracts/schemas")
    for path in write_schemas(target):
        print(path)


if __name__ == "__main__":
    main()
