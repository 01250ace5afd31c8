"""An AsyncAPI 3.0 document of the suite, generated from the registry (`make docs`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agentbus.contracts import registry
from agentbus.contracts.schemas import message_schemas

_TOKEN_DESCRIPTIONS = {
    "tenant": "Tenant id, [A-Za-z0-9_-]{1,64}.",
    "task_id": "Task id, [A-Za-z0-9_-]{1,64}.",
    "approver": "Approver id; must equal the decision's `approver` field.",
    "model": "Model routing name, [A-Za-z0-9_-]{1,64}.",
    "stream": "Name of the stream the dead message came from.",
    "consumer": "Durable consumer that gave up on it.",
    "service": "The service that recorded the span.",
}


def _channel_id(subject: registry.SubjectSpec) -> str:
    return subject.pattern.removeprefix(f"{registry.SUBJECT_ROOT}.").replace(".", "_").replace("{", "").replace("}", "")


def _message_name(subject: registry.SubjectSpec) -> str:
    return subject.message.__name__ if subject.message is not None else "TaskEvent"


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI document: one channel per subject, its payload schema, and who sends or receives it."""
    schemas = message_schemas()
    consumed = {c.filter_subject: c for c in registry.STATIC_CONSUMERS}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for subject in registry.SUBJECTS:
        channel_id = _channel_id(subject)
        name = _message_name(subject)
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": schemas[name],
        }
        if subject.stream is None:
            where = "Core NATS, not stored."
        else:
            stream = registry.stream_named(subject.stream)
            where = f"Stream {stream.name} ({stream.retention.value})."
        if subject.reply is not None:
            reply_name = subject.reply.__name__
            messages[reply_name] = {
                "name": reply_name,
                "contentType": "application/json",
                "payload": schemas[reply_name],
            }
            where += f" Answered with {reply_name}."
        channels[channel_id] = {
            "address": subject.pattern,
            "description": f"{subject.description} {where}",
            "parameters": {t: {"description": _TOKEN_DESCRIPTIONS.get(t, t)} for t in subject.tokens},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "tags": [{"name": "public" if subject.public else "internal"}],
        }
        consumer = consumed.get(subject.wildcard)
        if consumer is not None:
            operations[f"receive_{channel_id}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": f"{consumer.service}: {consumer.description} (durable {consumer.durable})",
            }
        else:
            operations[f"send_{channel_id}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": subject.description,
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "agentbus",
            "version": "1.0.0",
            "description": "AI agents as services on NATS JetStream. Payloads are UTF-8 JSON with schema_version 1.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "`agentbus up`"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/asyncapi.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(asyncapi_document(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(target)


if __name__ == "__main__":
    main()
