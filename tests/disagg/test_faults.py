"""kill -9 of a worker of a real `duoserve up` deployment under load (a router, 1 prefill, 2 decode workers).

What each test asserts, whatever the timing of the machine: every client's stream ends, either complete
(finish_reason with all its tokens) or with a terminal error (a 5xx status before the stream, or an
OpenAI-style error event in it), never cut short silently or left hanging; the clients of the killed
worker get that error; the router takes the worker out (new requests succeed on the survivors) and back
in when `up` has restarted it; and the survivors end with no KV block in use and no request left.
The time from the kill to each client's terminal error is recorded (`record_property`, and printed),
not asserted: the target is 2 s, and CI machines are slow.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from tests.disagg.test_deployment import MIN_REMOTE, WORKER_ARGS, complete, text_of, worker_metrics
from tests.helpers import random_prompt, wait_for
from tests.server.harness import ServerProcess, engine_flags

# Room for every request in flight at once (the tiny model's context is 256 tokens = 64 blocks of 4).
# The torch attention backend: three workers starting at once need no C++ kernel build to share.
FAULT_ARGS = {**WORKER_ARGS, "num_kv_blocks": 512, "attention_backend": "torch"}
MAX_TOKENS = 200  # long enough to be decoding when the worker is killed
STREAM_TIMEOUT = 60.0  # a stream that neither completes nor fails within this is a hang: the test fails


@pytest.fixture(scope="module")
def deployment(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("faults-log") / "up.log"
    flags = [*engine_flags(**FAULT_ARGS), "--remote-prefill-min-tokens", str(MIN_REMOTE)]
    flags.remove("--num-threads")  # `up` gives each worker its share of the cores
    flags.remove("1")
    flags += ["--prefill", "1", "--decode", "2", "--policy", "least_loaded"]
    router = ServerProcess(model_dir, log_path, flags, subcommand="up").start()
    wait_for(lambda: all(w["healthy"] for w in _workers(router)), what="all three workers")
    yield router
    router.stop()


def _workers(router: ServerProcess) -> list[dict]:
    return httpx.get(f"{router.base_url}/router/workers", timeout=10).json()["workers"]


def _worker(router: ServerProcess, url: str) -> dict:
    return next(w for w in _workers(router) if w["url"] == url)


@contextmanager
def _watch_taken_out(router: ServerProcess, url: str) -> Iterator[threading.Event]:
    """An event set once the router's pool shows the worker unhealthy, watched from before the kill: `up`
    restarts a killed worker and the router takes it back within seconds, so a check made only after the
    streams ended (which can take longer, on a slow machine) may never see it out."""
    wait_for(lambda: _worker(router, url)["healthy"], timeout=60, what=f"{url} in the router's pool")
    taken_out, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.is_set() and not taken_out.is_set():
            try:
                if not _worker(router, url)["healthy"]:
                    taken_out.set()
            except httpx.HTTPError:
                pass
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, name="watch-taken-out", daemon=True)
    watcher.start()
    try:
        yield taken_out
    finally:
        stop.set()
        watcher.join()


def _pid(url: str) -> int:
    return httpx.get(f"{url}/internal/info", timeout=10).json()["pid"]


@dataclass
class Outcome:
    status: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    ended_at: float = 0.0

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.finish_reason == "length" and self.tokens == MAX_TOKENS

    @property
    def failed(self) -> bool:  # a terminal error the client can see
        return self.status >= 500 or self.error is not None


async def read_stream(response: httpx.Response, outcome: Outcome) -> None:
    """A streamed completion's tokens, finish reason and error (or a refusal's body) into `outcome`."""
    if response.status_code != 200:
        outcome.error = (await response.aread()).decode(errors="replace")
        return
    async for line in response.aiter_lines():
        data = line.removeprefix("data: ")
        if not line.startswith("data: ") or data == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            outcome.error = event["error"]["message"]
            continue
        choice = event["choices"][0]
        outcome.tokens += len((choice["logprobs"] or {}).get("tokens") or [])
        outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason


async def _stream(
    client: httpx.AsyncClient, router: ServerProcess, prompt: list[int], accepted: asyncio.Event
):
    """One streamed completion; `accepted` is set once it has its status (or has ended)."""
    body = {
        "model": router.model,
        "prompt": text_of(prompt),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
    }
    outcome = Outcome()
    try:
        async with client.stream("POST", f"{router.base_url}/v1/completions", json=body) as response:
            outcome.status = response.status_code
            accepted.set()
            await read_stream(response, outcome)
        return outcome
    finally:
        outcome.ended_at = time.monotonic()
        accepted.set()


async def _kill_under_load(router: ServerProcess, prompts: list[list[int]], victim: str):
    """Run the prompts as concurrent streams and SIGKILL the victim's process once every one has its 200
    (it is on its workers); (time of the kill, outcomes)."""
    pid = _pid(victim)
    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as client:
        events = [asyncio.Event() for _ in prompts]
        tasks = [
            asyncio.create_task(_stream(client, router, p, e)) for p, e in zip(prompts, events, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), STREAM_TIMEOUT)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        done, hung = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT)
        for task in hung:
            task.cancel()
        if hung:
            pytest.fail(f"{len(hung)} streams neither completed nor failed {STREAM_TIMEOUT:.0f} s after it")
    return killed_at, [t.result() for t in tasks]


def _check_outcomes(outcomes: list[Outcome], killed_at: float, victim: str, record_property) -> list[float]:
    """Every stream ended complete or with a terminal error naming the victim; the errors' latencies."""
    for outcome in outcomes:
        assert outcome.complete or outcome.failed, (
            f"a stream ended with neither its tokens nor an error: {outcome}"
        )
        if outcome.failed:
            assert victim in outcome.error or outcome.status == 503, outcome
    latencies = sorted(round(o.ended_at - killed_at, 3) for o in outcomes if o.failed)
    record_property("seconds_from_kill_to_terminal_error", latencies)
    completed = len(outcomes) - len(latencies)
    print(f"kill -9 of {victim}: terminal errors after {latencies} s; {completed} completed")
    return latencies


def _wait_idle(urls: list[str]) -> None:
    """The workers hold no KV block and no request: nothing leaked."""

    def idle(url: str) -> bool:
        stats = worker_metrics(url)
        busy = stats["duoserve:num_requests_running"] + stats["duoserve:num_requests_waiting"]
        return stats["duoserve:kv_cache_usage_perc"] == 0 and busy == 0

    wait_for(
        lambda: all(idle(u) for u in urls), timeout=30, what=f"{urls} to hold no KV block and no request"
    )


def test_killed_decode_worker(deployment, record_property):
    prefill, lost, survivor = (w["url"] for w in _workers(deployment))
    # The prefill worker is stopped, so the requests sit in their prefill leg, on both decode workers
    # (least-loaded), when one of them dies: nothing is read from a decode worker's stream then, so the
    # router must learn of the loss by itself (a health check) and cut them. (If the stopped prefill
    # worker is taken out first, they are prefilled on their decode workers and end as the streams break.)
    prefill_pid = _pid(prefill)
    os.kill(prefill_pid, signal.SIGSTOP)
    with _watch_taken_out(deployment, lost) as taken_out:
        try:
            prompts = [random_prompt(30, seed=10 + i) for i in range(4)]
            killed_at, outcomes = asyncio.run(_kill_under_load(deployment, prompts, lost))
        finally:
            os.kill(prefill_pid, signal.SIGCONT)
        latencies = _check_outcomes(outcomes, killed_at, lost, record_property)
        assert len(latencies) == 2, "the killed decode worker had two of the four requests"
        wait_for(taken_out.is_set, timeout=30, what="the router to take it out")
    for seed in range(3):  # new requests go to the survivors (prefilled there or on the prefill worker)
        assert len(complete(deployment, random_prompt(4 + 10 * seed, seed=100 + seed), 3)) == 3
    _wait_idle([prefill, survivor])
    # `up` restarts it on the same port; the router takes it back and routes to it again.
    wait_for(lambda: _worker(deployment, lost)["healthy"], timeout=90, what="the decode worker to rejoin")
    _wait_routed_to(deployment, lost)
    _wait_idle([prefill, survivor, lost])


def _wait_routed_to(router: ServerProcess, url: str) -> None:
    """Short requests one at a time until one goes to the worker: least-loaded breaks ties by the fewest
    requests routed so far, so each request goes to it or narrows the gap."""
    before = _worker(router, url)["num_requests"]
    gap = max(w["num_requests"] for w in _workers(router)) - before
    for seed in range(gap + 2):
        assert len(complete(router, random_prompt(5, seed=200 + seed), 3)) == 3
        if _worker(router, url)["num_requests"] > before:
            return
    pytest.fail(f"the router sent nothing to {url} after it rejoined")


def test_killed_prefill_worker(deployment, record_property):
    prefill, *decode = (w["url"] for w in _workers(deployment))
    prompts = [random_prompt(40, seed=300 + i) for i in range(4)]  # all prefilled remotely, 5 chunks each
    with _watch_taken_out(deployment, prefill) as taken_out:
        killed_at, outcomes = asyncio.run(_kill_under_load(deployment, prompts, prefill))
        # Those with no token yet are prefilled on their decode worker instead; the others fail.
        _check_outcomes(outcomes, killed_at, prefill, record_property)
        wait_for(taken_out.is_set, timeout=30, what="the router to take it out")
    assert len(complete(deployment, random_prompt(40, seed=400), 3)) == 3  # prefilled on a decode worker
    _wait_idle(decode)
    wait_for(lambda: _worker(deployment, prefill)["healthy"], timeout=90, what="the prefill worker to rejoin")
    before = _worker(deployment, prefill)["num_requests"]
    assert len(complete(deployment, random_prompt(40, seed=401), 3)) == 3  # prefilled remotely again
    assert _worker(deployment, prefill)["num_requests"] == before + 1
    _wait_idle([prefill, *decode])
