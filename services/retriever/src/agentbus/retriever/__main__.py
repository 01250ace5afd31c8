"""`python -m agentbus.retriever`: run the retriever until SIGTERM.

`python -m agentbus.retriever bootstrap` creates or checks the chunk collection (idempotent) and exits.
"""

from __future__ import annotations

import asyncio
import sys

from agentbus.contracts.registry import Service
from agentbus.retriever.app import create_app, create_embedder, prepare_index
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.service import run_service
from pydantic import ValidationError

BOOTSTRAP_COMMAND = "bootstrap"
GIL_SWITCH_INTERVAL_SECONDS = 0.001
"""How long a thread decoding Milvus results may hold the interpreter before the event loop gets a turn.
Python's default, 5 ms, is as long as a /healthz answer or a ready reply could wait for each such turn."""


async def bootstrap(settings: RetrieverSettings) -> list[str]:
    """Create or check the collection with the configured embedding model's vector size."""
    # Only the vector size is needed: no worker processes for that.
    embedder = create_embedder(settings.model_copy(update={"embedding_processes": 0}))
    index, actions = await prepare_index(settings, embedder)
    await index.close()
    await embedder.close()
    return actions


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == [BOOTSTRAP_COMMAND]:
        try:
            actions = asyncio.run(bootstrap(RetrieverSettings()))
        except (ConfigurationError, ValidationError) as exc:
            print(f"{Service.RETRIEVER}: bootstrap failed: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
        for action in actions:
            print(action)
        return
    if args:
        print(f"usage: python -m agentbus.retriever [{BOOTSTRAP_COMMAND}]", file=sys.stderr)
        raise SystemExit(2)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    run_service(Service.RETRIEVER, lambda: create_app(RetrieverSettings()))


if __name__ == "__main__":
    main()
