"""Under load: clients that leave free their KV blocks at once, and a flood past --max-queued-requests
gets 429s while every admitted request completes."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
import pytest

from tests.helpers import random_prompt
from tests.server.harness import wait_for_metrics

# Requests that hold their seats must outlast the test's next round trip by a wide margin on any machine:
# 240 tokens of the tiny model (~0.2 s) once finished first on a fast CI host (the flood then got two 200s).
LONG = 2000
SHORT = 16
DEADLINE = 60.0  # generous: each wait returns as soon as its condition holds


@pytest.fixture(scope="module")
def server(start_server):
    # Two seats in the running batch and two in the queue: the fifth concurrent request is refused.
    # A context past the tiny model's 256 positions (RoPE has no limit): a request can run 2,000 steps.
    return start_server(
        "--max-queued-requests", "2", "--max-model-len", "2048", max_num_seqs=2, num_kv_blocks=1024
    )


async def wait_for_metrics_async(server, condition, what: str) -> dict[str, float]:
    """The same from a coroutine: the event loop keeps running the requests meanwhile."""
    return await asyncio.to_thread(wait_for_metrics, server, condition, what)


def idle(m: dict[str, float]) -> bool:
    return m["duoserve:kv_cache_usage_perc"] == 0 and m["duoserve:num_requests_running"] == 0


def test_disconnected_clients_free_their_kv_blocks(server):
    aborted = 'duoserve:request_success_total{finished_reason="abort"}'
    aborted_before = server.metrics()[aborted]

    async def run() -> dict[str, float]:
        async with (
            openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="-", max_retries=0) as client,
            httpx.AsyncClient(base_url=server.base_url, timeout=DEADLINE) as http,
        ):
            # Two streams take both seats of the running batch...
            streams = []
            for seed in range(2):
                stream = await client.completions.create(
                    model=server.model,
                    prompt=random_prompt(8, seed=seed),
                    max_tokens=LONG,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                received = 0
                async for _ in stream:
                    received += 1
                    if received == 3:
                        break
                streams.append(stream)
            # ...so a non-streaming request waits in the queue until the client gives up on it.
            body = {"model": server.model, "prompt": random_prompt(8, seed=5), "max_tokens": LONG}
            request = asyncio.ensure_future(http.post("/v1/completions", json={**body, "ignore_eos": True}))
            busy = await wait_for_metrics_async(
                server,
                lambda m: m["duoserve:num_requests_waiting"] == 1,
                "the non-streaming request to be queued",
            )
            request.cancel()  # its connection closes
            with contextlib.suppress(asyncio.CancelledError):
                await request
            for stream in streams:
                await stream.close()  # the clients go away mid-stream
            return busy

    busy = asyncio.run(run())
    assert busy["duoserve:num_requests_running"] == 2 and busy["duoserve:kv_cache_usage_perc"] > 0
    after = wait_for_metrics(
        server, lambda m: idle(m) and m[aborted] >= aborted_before + 3, "three aborts and an idle engine"
    )
    assert after[aborted] == aborted_before + 3
    assert server.log().count("finish_reason=abort") == 3


def test_a_flood_past_the_queue_gets_429_and_every_admitted_request_completes(server):
    def body(i: int, max_tokens: int) -> dict:
        prompt = random_prompt(6, seed=100 + i)
        return {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}

    async def flood() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=DEADLINE) as http:
            # Two very long requests take the two seats, then two short ones the two queue places...
            running = [
                asyncio.ensure_future(http.post("/v1/completions", json=body(i, LONG))) for i in (0, 1)
            ]
            await wait_for_metrics_async(
                server, lambda m: m["duoserve:num_requests_running"] == 2, "two running requests"
            )
            queued = [
                asyncio.ensure_future(http.post("/v1/completions", json=body(i, SHORT))) for i in (2, 3)
            ]
            await wait_for_metrics_async(
                server,
                lambda m: m["duoserve:num_requests_running"] == 2 and m["duoserve:num_requests_waiting"] == 2,
                "two running and two queued requests",
            )
            # ...so while they run, every other request is refused.
            flood = [http.post("/v1/completions", json=body(i, SHORT)) for i in range(4, 16)]
            refused = await asyncio.gather(*flood)
            return list(await asyncio.gather(*running, *queued)), refused

    admitted, refused = asyncio.run(flood())
    assert [r.status_code for r in refused] == [429] * 12
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert (
            r.json()["error"]["type"] == "rate_limit_error"
            and "queue is full" in r.json()["error"]["message"]
        )
    assert [r.status_code for r in admitted] == [200] * 4
    for r, max_tokens in zip(admitted, [LONG, LONG, SHORT, SHORT], strict=True):
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == max_tokens
    wait_for_metrics(server, idle, "an idle engine")
