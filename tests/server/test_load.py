"""Under load: clients that leave free their KV blocks at once, and a flood past --max-queued-requests
gets 429s while every admitted request completes."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.helpers import random_prompt

LONG = 240  # tokens: with the 8-token prompts, nearly the whole 256-token context
FLOOD_TOKENS = 128  # long enough that the first admitted requests still run when the last ones arrive


@pytest.fixture(scope="module")
def server(start_server):
    # Two seats in the running batch and two in the queue: the fifth concurrent request is refused.
    return start_server("--max-queued-requests", "2", max_num_seqs=2, num_kv_blocks=128)


def wait_for_metrics(server, condition, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if condition(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def idle(m: dict[str, float]) -> bool:
    return m["duoserve:kv_cache_usage_perc"] == 0 and m["duoserve:num_requests_running"] == 0


def test_disconnected_clients_free_their_kv_blocks(server):
    aborted_before = server.metrics()['duoserve:request_success_total{finished_reason="abort"}']

    async def run() -> dict[str, float]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="-", max_retries=0) as client:
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
            busy = server.metrics()
            for stream in streams:
                await stream.close()  # the client goes away mid-stream
            return busy

    busy = asyncio.run(run())
    assert busy["duoserve:num_requests_running"] == 2 and busy["duoserve:kv_cache_usage_perc"] > 0
    # A non-streaming client that gives up (read timeout) is aborted too.
    body = {"model": server.model, "prompt": random_prompt(8, seed=5), "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.05))

    after = wait_for_metrics(
        server,
        lambda m: (
            idle(m) and m['duoserve:request_success_total{finished_reason="abort"}'] >= aborted_before + 3
        ),
    )
    assert idle(after)
    assert after['duoserve:request_success_total{finished_reason="abort"}'] == aborted_before + 3
    assert server.log().count("finish_reason=abort") == 3


def test_a_flood_past_the_queue_gets_429_and_every_admitted_request_completes(server):
    async def one(http: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {
            "model": server.model,
            "prompt": random_prompt(6, seed=100 + i),
            "max_tokens": FLOOD_TOKENS,
            "ignore_eos": True,
        }
        return await http.post("/v1/completions", json=body)

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    admitted = [r for r in responses if r.status_code == 200]
    assert refused and len(admitted) >= 2, statuses
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert (
            r.json()["error"]["type"] == "rate_limit_error"
            and "queue is full" in r.json()["error"]["message"]
        )
    for r in admitted:
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == FLOOD_TOKENS
    assert idle(wait_for_metrics(server, idle))
