"""A RouterClient in this process in front of a real worker process: however a request ends (finished,
a stop string, the client gone, aborted before its route even started), the router keeps nothing of
it, the worker's load is back to 0, and the worker stops computing it."""

from __future__ import annotations

import asyncio
import time

import pytest

from duoserve.router.dns_discovery import DnsSource
from duoserve.router.router import RouterClient
from duoserve.router.routing import RouterConfig
from duoserve.sampling_params import SamplingParams
from duoserve.server.engine_client import EngineUnavailable
from tests.helpers import random_prompt
from tests.server.harness import ServerProcess, engine_flags, free_port

DEADLINE = 60.0  # generous: each wait returns as soon as its condition holds
# A worker counts no request metrics for a router's requests (the router does), but it counts the
# tokens its engine computes.
COMPUTED = "duoserve:iteration_tokens_total_sum"


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("worker-log") / "worker.log"
    process = ServerProcess(model_dir, log_path, engine_flags(attention_backend="torch")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def router(model_dir, worker):
    loop = asyncio.new_event_loop()
    config = RouterConfig(decode_urls=[worker.base_url], health_interval=0.2)
    client = RouterClient(model_dir, config, log_level="WARNING")
    loop.run_until_complete(client.start())
    yield client, loop
    loop.run_until_complete(client.shutdown())
    loop.close()


def run(router, make_coroutine) -> None:
    client, loop = router

    async def bounded() -> None:
        async with asyncio.timeout(2 * DEADLINE):
            await make_coroutine(client)

    loop.run_until_complete(bounded())


async def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def router_tables(client: RouterClient) -> dict[str, int]:
    tables = {
        "_routes": client._routes,
        "_seq_routes": client._seq_routes,
        "streams": client.streams,
        "_seqs": client._seqs,
        "processor.requests": client.processor.requests,
    }
    sizes = {name: len(table) for name, table in tables.items() if table}
    for w in client.policy.workers:
        if w.active_tokens or w.queued_prefill_tokens:
            sizes[w.url] = w.active_tokens + w.queued_prefill_tokens
    return sizes


async def settled(client: RouterClient, worker: ServerProcess) -> None:
    """The router holds nothing of the request, and the worker has stopped computing it."""
    await wait_until(lambda: not router_tables(client), "the router to forget the request")

    def worker_idle() -> bool:
        m = worker.metrics()
        return m["duoserve:num_requests_running"] == m["duoserve:num_requests_waiting"] == 0 and (
            m["duoserve:kv_cache_usage_perc"] == 0
        )

    await wait_until(worker_idle, "the worker to be idle")


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


async def generate(client: RouterClient, request_id: str, params: SamplingParams, seed: int):
    stream = await client.add_request(request_id, None, random_prompt(8, seed=seed), params)
    return [output async for output in client.outputs(stream)]


def test_finished_request(router, worker):
    async def scenario(client: RouterClient):
        outputs = await generate(client, "done", greedy(5, n=2), seed=1)
        assert [c.finish_reason for c in outputs[-1].outputs] == ["length", "length"]
        await settled(client, worker)

    run(router, scenario)


def test_a_stop_string_stops_the_worker(router, worker):
    async def scenario(client: RouterClient):
        probe = await generate(client, "probe", greedy(3), seed=2)
        stop = client.tokenizer.decode(probe[-1].outputs[0].token_ids[1:2], True).strip()
        before = worker.metrics()[COMPUTED]
        outputs = await generate(client, "stopped", greedy(240, stop=[stop]), seed=2)
        assert outputs[-1].outputs[0].stop_reason == stop
        await settled(client, worker)
        # The worker was told: it did not run on to max_tokens, which takes 239 decode steps after
        # the first token (the abort takes a few event-loop turns; the prompt is partly cached).
        assert worker.metrics()[COMPUTED] - before < 239

    run(router, scenario)


def test_client_that_leaves_mid_stream(router, worker):
    async def scenario(client: RouterClient):
        before = worker.metrics()[COMPUTED]
        stream = await client.add_request("left", None, random_prompt(8, seed=3), greedy(240))
        outputs = client.outputs(stream)
        await anext(outputs)
        await outputs.aclose()
        await settled(client, worker)
        assert worker.metrics()[COMPUTED] - before < 239

    run(router, scenario)


def test_request_aborted_before_its_route_started(router, worker):
    async def scenario(client: RouterClient):
        adding = asyncio.ensure_future(client.add_request("early", None, random_prompt(8, seed=4), greedy(8)))
        await asyncio.sleep(0)  # handed to the router: its route task exists, but has not run yet
        assert not client._routes["early"].task.done()
        client.abort("early")
        with pytest.raises(asyncio.CancelledError):
            await adding
        await settled(client, worker)

    run(router, scenario)


def test_a_prefill_worker_lost_unnoticed_falls_back_to_local_prefill(model_dir, router, worker):
    """The router still takes the prefill worker for up (no health check since it went): the request
    tries it, then prefills on its decode worker, and leaves nothing behind on either side."""
    prompt = random_prompt(20, seed=5)

    async def reference(client: RouterClient) -> None:
        stream = await client.add_request("local", None, prompt, greedy(6))
        reference.tokens = [o async for o in client.outputs(stream)][-1].outputs[0].token_ids

    run(router, reference)
    loop = asyncio.new_event_loop()
    config = RouterConfig(
        prefill_urls=[f"http://127.0.0.1:{free_port()}"],  # nobody listens there
        decode_urls=[worker.base_url],
        remote_prefill_min_tokens=4,
        health_interval=3600,  # one health check, at start: the router never notices by itself
    )
    client = RouterClient(model_dir, config, log_level="WARNING")
    loop.run_until_complete(client.start())
    (prefill,) = client.policy.prefill
    prefill.healthy = True  # what it believed before the worker went away

    async def scenario(client: RouterClient):
        stream = await client.add_request("fallback", None, prompt, greedy(6))
        outputs = [o async for o in client.outputs(stream)]
        assert outputs[-1].outputs[0].token_ids == reference.tokens
        assert client.num_remote_prefills == 1 and not prefill.healthy  # it tried, then marked it down
        await settled(client, worker)

    try:
        run((client, loop), scenario)
    finally:
        loop.run_until_complete(client.shutdown())
        loop.close()


def test_dns_discovery_learns_the_role_and_forgets_a_worker_whose_record_goes(model_dir, worker):
    """`--discover dns:NAME`: the worker is found by its record (the resolver is injected), its role
    learned from its /internal/info; routed to once ready, and forgotten when its record goes."""
    records = ["127.0.0.1"]

    async def resolve(name: str) -> list[str]:
        assert name == "workers.duoserve.svc"
        return list(records)

    source = DnsSource("workers.duoserve.svc", worker.port, interval=0.05, resolve=resolve)
    config = RouterConfig(discover=[f"dns:workers.duoserve.svc:{worker.port}"], health_interval=0.2)
    loop = asyncio.new_event_loop()
    client = RouterClient(model_dir, config, log_level="WARNING", sources=[source])
    loop.run_until_complete(client.start())

    async def scenario(client: RouterClient):
        (found,) = client.policy.workers
        assert found.url == worker.base_url and found.kind == "decode" and found.role == "both"
        outputs = await generate(client, "found", greedy(3), seed=6)
        assert len(outputs[-1].outputs[0].token_ids) == 3
        await settled(client, worker)
        records.clear()  # the pod is gone from the headless Service
        await wait_until(lambda: not client.policy.workers, "the worker to be forgotten")
        with pytest.raises(EngineUnavailable, match="no decode"):
            client.check_available()
        records.append("127.0.0.1")  # back: checked again before it is routed to
        await wait_until(lambda: client.policy.workers and client.policy.workers[0].ready, "it to rejoin")

    try:
        run((client, loop), scenario)
    finally:
        loop.run_until_complete(client.shutdown())
        loop.close()
