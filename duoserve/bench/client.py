"""Async streaming HTTP client for OpenAI-compatible endpoints, filling in RequestRecords."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from duoserve.bench.payload import is_chat
from duoserve.bench.records import RequestRecord
from duoserve.bench.stream import StreamRecorder

Clock = Callable[[], float]
_ERROR_BODY_CHARS = 300


@dataclass
class ClientConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    request_timeout: float = 600.0  # per request, connect to last byte
    max_connections: int | None = None  # None: unbounded, so open-loop arrivals never queue in the pool


class BenchClient:
    """One pooled httpx.AsyncClient shared by every request of a run."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        limits = httpx.Limits(
            max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections
        )
        self._http = httpx.AsyncClient(
            base_url=cfg.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(cfg.request_timeout, connect=min(30.0, cfg.request_timeout)),
            limits=limits,
        )

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def first_model(self) -> str:
        """The first model GET /v1/models lists: the default --model, as vLLM's benchmark does."""
        resp = await self._http.get("/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise ValueError(f"{self.cfg.base_url}/v1/models lists no model; pass --model")
        return str(models[0].get("id"))

    async def stream(self, body: dict[str, Any], record: RequestRecord, clock: Clock) -> None:
        """POST `body` and record the stream into `record`. Never raises except on cancellation."""
        recorder = StreamRecorder(record, is_chat(self.cfg.endpoint))
        record.send_time = clock()
        try:
            await self._consume(body, recorder, clock)
        except asyncio.CancelledError:
            record.error = "cancelled: benchmark timeout"
            raise
        except httpx.HTTPError as e:
            record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            recorder.finish(clock())

    async def _consume(self, body: dict[str, Any], recorder: StreamRecorder, clock: Clock) -> None:
        async with self._http.stream("POST", self.cfg.endpoint, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                recorder.record.error = f"HTTP {resp.status_code}: {text[:_ERROR_BODY_CHARS]}"
                return
            async for line in resp.aiter_lines():
                if not recorder.feed_line(line, clock()):
                    return
