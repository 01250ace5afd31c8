"""The OpenAI-compatible embeddings backend against a real HTTP server on a free port."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from agentbus.retriever.adapters.openai_embeddings import OpenAIEmbedder
from agentbus.retriever.ports import EmbeddingError


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    status = 200
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if type(self).status != 200:
            self.send_response(type(self).status)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        # Items deliberately out of order: the client must sort by index. Vectors are not unit length.
        data = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0, 2.0]} for i, t in enumerate(body["input"])]
        payload = json.dumps({"data": list(reversed(data)), "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def server() -> Iterator[str]:
    _EmbeddingsHandler.status = 200
    _EmbeddingsHandler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EmbeddingsHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_batches_keep_order_are_normalised_and_probe_the_dimension(server: str) -> None:
    embedder = OpenAIEmbedder(server, "bge-small", api_key="secret", batch_size=2)
    await embedder.start()
    try:
        assert embedder.dimension == 4
        vectors = await embedder.embed_documents(["a", "bbb", "cc"])
        assert vectors.shape == (3, 4)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
        assert vectors[0, 0] < vectors[2, 0] < vectors[1, 0]  # first component grows with the text's length
        query = await embedder.embed_query("bbb")
        assert np.allclose(query, vectors[1])
    finally:
        await embedder.close()
    sent = _EmbeddingsHandler.requests
    assert {r["path"] for r in sent} == {"/v1/embeddings"}
    assert {r["auth"] for r in sent} == {"Bearer secret"}
    assert [r["input"] for r in sent[1:3]] == [["a", "bbb"], ["cc"]]


async def test_overload_is_retryable_and_a_wrong_dimension_is_not(server: str) -> None:
    embedder = OpenAIEmbedder(server, "m", dimension=8)
    try:
        with pytest.raises(EmbeddingError) as wrong:
            await embedder.embed_query("x")
        assert not wrong.value.retryable
        _EmbeddingsHandler.status = 503
        with pytest.raises(EmbeddingError) as busy:
            await embedder.embed_query("x")
        assert busy.value.retryable
    finally:
        await embedder.close()
    unreachable = OpenAIEmbedder("http://127.0.0.1:9/v1", "m", dimension=4, timeout_seconds=2)
    with pytest.raises(EmbeddingError) as down:
        await unreachable.embed_query("x")
    assert down.value.retryable
    await unreachable.close()
