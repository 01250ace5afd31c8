"""Each service's readiness, from its own /readyz."""

from __future__ import annotations

import asyncio

import httpx
from agentbus.gateway.ports import ServiceReadiness

READYZ_PATH = "/readyz"


class HttpServiceProbe:
    def __init__(self, urls: dict[str, str], timeout_seconds: float = 2.0) -> None:
        self._urls = dict(sorted(urls.items()))
        self._timeout = timeout_seconds

    async def readiness(self) -> list[ServiceReadiness]:
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            return list(await asyncio.gather(*(self._probe(client, s, u) for s, u in self._urls.items())))

    async def _probe(self, client: httpx.AsyncClient, service: str, url: str) -> ServiceReadiness:
        target = url.rstrip("/") + READYZ_PATH
        try:
            response = await client.get(target)
        except httpx.HTTPError as exc:
            return ServiceReadiness(service, target, False, f"no answer: {type(exc).__name__}")
        return ServiceReadiness(service, target, response.status_code == 200, response.text.strip()[:200])
