"""The collection bootstrap: idempotent, and refusing a collection it cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentbus.retriever.adapters.milvus import SchemaMismatchError, connect, ensure_collection


def test_ensure_collection_is_idempotent_and_refuses_another_vector_size(tmp_path: Path) -> None:
    uri = str(tmp_path / "nested" / "index.db")
    client = connect(uri)
    try:
        first = ensure_collection(client, "chunks", 8)
        assert first[0].startswith("created collection chunks")
        again = ensure_collection(client, "chunks", 8)
        assert again == ["collection chunks exists and matches"]
        with pytest.raises(SchemaMismatchError, match="8-dimensional"):
            ensure_collection(client, "chunks", 16)
    finally:
        client.close()


def test_bootstrap_command_creates_then_checks_the_collection(tmp_path: Path) -> None:
    env = {**os.environ, "AGENTBUS_RETRIEVER_MILVUS_URI": str(tmp_path / "cli.db")}
    command = [sys.executable, "-m", "agentbus.retriever", "bootstrap"]
    created = subprocess.run(command, env=env, capture_output=True, text=True, timeout=110, check=False)
    assert created.returncode == 0, created.stderr
    assert "created collection agentbus_chunks (dense dim 384" in created.stdout
    wrong = subprocess.run(
        command,
        env={**env, "AGENTBUS_RETRIEVER_EMBEDDING_BACKEND": "openai"},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert wrong.returncode != 0
    assert "embedding_url" in wrong.stderr
