"""The API process's EngineClient in this process, over a real engine process: garbage on either IPC
socket is dropped and counted and both sides still serve; no request leaves state behind, whichever
way it ends (finished, aborted, client gone, stop string, refused, a router's request)."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import pytest
import zmq

from duoserve.config import EngineConfig
from duoserve.engine.engine_env import WAIT_VARS
from duoserve.plan.trace import StepTraceObserver, read_trace
from duoserve.sampling_params import SamplingParams
from duoserve.server.engine_client import EngineClient, RequestRejected
from duoserve.server.engine_messages import AddRequest
from tests.helpers import random_prompt
from tests.server.harness import ENGINE_ARGS

DEADLINE = 60.0  # generous: each wait returns as soon as its condition holds
# The torch attention backend: the CPU kernel is not what these tests are about, and loading it costs
# the engine process seconds on a busy machine.
CONFIG = {**ENGINE_ARGS, "attention_backend": "torch"}


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("step-trace")


@pytest.fixture(scope="module")
def engine(model_dir, trace_dir):
    """A started EngineClient (and its engine process, writing a step trace) and its event loop."""
    loop = asyncio.new_event_loop()
    observer = StepTraceObserver(str(trace_dir / "steps-{role}-{pid}.jsonl"), role="decode")
    client = EngineClient(
        EngineConfig(model=model_dir, **CONFIG), log_level="WARNING", make_step_observer=observer
    )
    loop.run_until_complete(client.start())
    yield client, loop
    loop.run_until_complete(client.shutdown())
    loop.close()


def run(engine, make_coroutine) -> None:
    """Run a scenario on the client's loop; one that hangs (a dead receive task) fails, not blocks."""
    client, loop = engine

    async def bounded() -> None:
        async with asyncio.timeout(2 * DEADLINE):
            await make_coroutine(client)

    loop.run_until_complete(bounded())


def metric(client: EngineClient, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def client_tables(client: EngineClient) -> dict[str, int]:
    """The client's per-request tables that are not empty, with their sizes."""
    tables = {
        "streams": client.streams,
        "_seqs": client._seqs,
        "raw_streams": client.raw_streams,
        "_raw_seqs": client._raw_seqs,
        "processor.requests": client.processor.requests,
        "processor._owner": client.processor._owner,
    }
    return {name: len(table) for name, table in tables.items() if table}


def engine_idle(client: EngineClient) -> bool:
    stats = client.metrics.engine_state.stats
    return stats.get("num_requests_running") == 0 == stats.get("num_requests_waiting") and (
        stats.get("kv_cache_usage_perc") == 0
    )


async def settled(client: EngineClient) -> None:
    """Wait until the engine holds nothing, then check that the client holds nothing either."""
    await wait_until(lambda: engine_idle(client), "the engine to be idle")
    assert client_tables(client) == {}


def params(max_tokens: int = 6, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


async def generate(client: EngineClient, request_id: str, sampling: SamplingParams, seed: int = 0):
    stream = await client.add_request(request_id, None, random_prompt(8, seed=seed), sampling)
    return [output async for output in client.outputs(stream)]


# ------------------------------------------------------------------------------------ untrusted input

DROPPED = "duoserve:untrusted_messages_dropped_total"


def test_garbage_to_the_engine_is_dropped_counted_and_it_still_serves(engine):
    async def scenario(client: EngineClient):
        for garbage in (b"\xc1\xc1", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"type": "X"})):
            client._outgoing.put_nowait(garbage)  # through the real socket, as the API's own messages go
        await wait_until(
            lambda: metric(client, DROPPED, socket="engine_ipc", reason="invalid") == 2,
            "the engine to report its drops",
        )
        assert metric(client, DROPPED, socket="engine_ipc", reason="malformed") == 1
        outputs = await generate(client, "after-garbage", params(5))
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5
        await settled(client)

    run(engine, scenario)


def test_garbage_from_the_engine_side_is_dropped_counted_and_the_api_still_serves(engine):
    async def scenario(client: EngineClient):
        context = zmq.Context()
        intruder = context.socket(zmq.PUSH)
        intruder.connect(f"ipc://{client._socket_dir}/outputs")  # the API process's inbox
        try:
            intruder.send(b"\xc1 not msgpack")
            intruder.send(msgspec.msgpack.encode({"type": "EngineOutputs"}))  # no timestamp
            await wait_until(
                lambda: metric(client, DROPPED, socket="api_ipc", reason="invalid") == 1,
                "the API process to count the drops",
            )
            assert metric(client, DROPPED, socket="api_ipc", reason="malformed") == 1
        finally:
            intruder.close(linger=0)
            context.term()
        outputs = await generate(client, "after-intruder", params(5))
        assert outputs[-1].finished and client.dead is None
        await settled(client)

    run(engine, scenario)


# ------------------------------------------------------------------------------------ every ending


def test_finished_request(engine):
    async def scenario(client: EngineClient):
        outputs = await generate(client, "done", params(6, n=2))
        assert [c.finish_reason for c in outputs[-1].outputs] == ["length", "length"]
        await settled(client)

    run(engine, scenario)


def test_the_engine_process_writes_the_step_trace_its_caller_built(engine, trace_dir):
    """The step observer the caller built (duoserve/plan/trace.py) crossed to the spawned engine process:
    its trace's header names the worker's role, and a request's steps are in it, batch by batch."""

    async def scenario(client: EngineClient):
        await generate(client, "traced", params(6, n=2))
        await settled(client)

    run(engine, scenario)
    client, _ = engine
    (path,) = trace_dir.glob(f"steps-decode-{client._process.pid}.jsonl")
    trace = read_trace(str(path))
    assert trace.header["role"] == "decode" and trace.header["pid"] == client._process.pid
    rows = [row for step in trace.steps for row in step.scheduled if row[0].startswith("traced#")]
    assert {row[0] for row in rows} == {"traced#0", "traced#1"}
    assert any(step.shape.decode_seqs == 2 for step in trace.steps)


def test_aborted_request(engine):
    async def scenario(client: EngineClient):
        stream = await client.add_request("aborted", None, random_prompt(8, seed=1), params(200, n=2))
        await wait_until(lambda: not stream.queue.empty(), "its first output")
        client.abort("aborted")
        await settled(client)

    run(engine, scenario)


def test_client_that_leaves_mid_stream(engine):
    async def scenario(client: EngineClient):
        stream = await client.add_request("left", None, random_prompt(8, seed=2), params(200))
        outputs = client.outputs(stream)
        await anext(outputs)
        await outputs.aclose()  # what a disconnected client's handler does
        await settled(client)

    run(engine, scenario)


def test_client_that_leaves_before_acceptance(engine):
    async def scenario(client: EngineClient):
        task = asyncio.ensure_future(client.add_request("early", None, random_prompt(8, seed=3), params(200)))
        await asyncio.sleep(0)  # sent, not yet accepted
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled(client)

    run(engine, scenario)


def test_request_a_stop_string_ends(engine):
    async def scenario(client: EngineClient):
        first = await generate(client, "probe", params(3), seed=4)
        stop = client.tokenizer.decode(first[-1].outputs[0].token_ids[1:2], True).strip()
        outputs = await generate(client, "stopped", params(200, stop=[stop]), seed=4)
        assert outputs[-1].outputs[0].stop_reason == stop
        await settled(client)

    run(engine, scenario)


def test_refused_request(engine):
    async def scenario(client: EngineClient):
        with pytest.raises(RequestRejected) as refused:
            await generate(client, "too-long", params(10_000))
        assert refused.value.status == 400
        await settled(client)

    run(engine, scenario)


def test_router_requests_finished_and_aborted(engine):
    async def scenario(client: EngineClient):
        done = client.add_raw(AddRequest("raw", ["raw"], random_prompt(8, seed=5), [params(4)], []))
        while await done.queue.get() is not None:
            pass
        running = client.add_raw(AddRequest("raw2", ["raw2"], random_prompt(8, seed=6), [params(200)], []))
        await running.queue.get()
        client.abort_raw("raw2")
        refused = client.add_raw(AddRequest("raw3", ["raw3"], [10**6], [params(4)], []))
        while await refused.queue.get() is not None:
            pass
        await settled(client)

    run(engine, scenario)


def test_engine_process_threads_spin_briefly(engine):
    """The engine process started with GOMP_SPINCOUNT=3000 (duoserve.engine.engine_env), unless
    this process already set a wait policy, which it then inherits as it is."""
    client, _ = engine
    with open(f"/proc/{client._process.pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    if any(name in os.environ for name in WAIT_VARS):
        for name in WAIT_VARS:
            assert environ.get(name.encode()) == os.environb.get(name.encode())
    else:
        assert environ[b"GOMP_SPINCOUNT"] == b"3000"
