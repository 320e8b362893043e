"""`duoserve router --discover k8s` over real workers, with a local server speaking the Kubernetes API's
EndpointSlice list/watch (tests/router/fake_k8s.py), while requests flow.

The workers are pods of one headless Service: one port, their own addresses (127.0.0.1, .2, .3), the
same fixed KV ports, each advertising its own address. Workers are listed not ready, made ready,
drained (SIGTERM, marked terminating, then deleted), added while still loading, and killed (-9).
Throughout: no request goes to a worker that is not ready (the router's count of requests routed to it
stays 0, and its engine computes nothing), and none fails that the router could have sent elsewhere;
the only failures are those of requests already streaming from the killed worker, as terminal errors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import httpx
import pytest

from tests.disagg.test_faults import Outcome, read_stream
from tests.helpers import random_prompt, wait_for, word
from tests.router.fake_k8s import FakeKubernetes, endpoint_slice
from tests.server.harness import ServerProcess, engine_flags, free_port

SLICE = "decode-h7x2k"  # the EndpointSlice of the Service labelled duoserve.io/role=both
MAX_TOKENS = 16
STREAM_TIMEOUT = 60.0
WORKER_ARGS = engine_flags(attention_backend="torch", num_kv_blocks=256)


class Flow:
    """Streamed completions, two at a time, from a thread, until stopped."""

    def __init__(self, router: ServerProcess) -> None:
        self.router = router
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(2 * STREAM_TIMEOUT)
        assert not self.thread.is_alive(), "a stream neither completed nor failed"

    def wait_done(self, count: int) -> None:
        start = len(self.outcomes)
        wait_for(lambda: len(self.outcomes) >= start + count, STREAM_TIMEOUT, f"{count} more requests")

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
            seed = 0
            while not self.stopping.is_set():
                seed += 2
                self.outcomes += await asyncio.gather(self._one(http, seed), self._one(http, seed + 1))

    async def _one(self, http: httpx.AsyncClient, seed: int) -> Outcome:
        prompt = " ".join(word(t) for t in random_prompt(6, seed=seed))
        body = {"model": self.router.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "logprobs": 0}
        outcome = Outcome()
        async with http.stream(
            "POST",
            f"{self.router.base_url}/v1/completions",
            json={**body, "ignore_eos": True, "stream": True},
        ) as response:
            outcome.status = response.status_code
            await read_stream(response, outcome)
        return outcome


def start_worker(model_dir: str, tmp_path, host: str, port: int, kv_ports: tuple[int, int]) -> ServerProcess:
    flags = [*WORKER_ARGS, "--role", "both", "--advertise-host", host]
    flags += ["--kv-port", str(kv_ports[0]), "--kv-events-port", str(kv_ports[1])]
    log = tmp_path / f"worker-{host}.log"
    return ServerProcess(model_dir, log, flags, port=port, host=host).start(wait=False)


class Router:
    """The router process and what it says of its workers. Every look checks the invariant: a worker
    seen not ready had no request routed to it since it was last seen (0 if never seen ready)."""

    def __init__(self, process: ServerProcess) -> None:
        self.process = process
        self.seen: dict[str, tuple[bool, int]] = {}  # url -> (ready, requests routed to it), last look

    def workers(self) -> dict[str, dict]:
        response = httpx.get(f"{self.process.base_url}/router/workers", timeout=10)
        workers = {w["url"]: w for w in response.json()["workers"]}
        for url, worker in workers.items():
            was_ready, count = self.seen.get(url, (False, 0))
            if not worker["ready"] and not was_ready:
                assert worker["num_requests"] == count, f"a request went to {url} while it was not ready"
            self.seen[url] = (worker["ready"], worker["num_requests"])
        return workers

    def wait(self, condition, what: str) -> dict[str, dict]:
        return wait_for(lambda: condition(self.workers()), 120, what)


def computed(worker: ServerProcess) -> float:
    return worker.metrics()["duoserve:iteration_tokens_total_sum"]


@pytest.fixture
def cluster(model_dir, tmp_path):
    port = free_port()
    kv_ports = (free_port(), free_port())
    started: list[ServerProcess] = []

    def worker(host: str) -> ServerProcess:
        started.append(start_worker(model_dir, tmp_path, host, port, kv_ports))
        return started[-1]

    with FakeKubernetes() as fake:
        yield fake, worker, port, started
        for process in started:
            process.stop()


def test_workers_come_and_go_under_discovery_while_requests_flow(model_dir, tmp_path, cluster):
    fake, worker, port, started = cluster
    w1, w2 = worker("127.0.0.1"), worker("127.0.0.2")
    url1, url2, url3 = (f"http://127.0.0.{i}:{port}" for i in (1, 2, 3))

    def listing(*endpoints: tuple[str, bool, bool]) -> None:
        fake.apply(endpoint_slice(SLICE, "both", port, list(endpoints)))

    listing(("127.0.0.1", True, False), ("127.0.0.2", False, False))  # w2: its readiness probe fails
    for process in (w1, w2):
        process._wait_ready()
    flags = ["--discover", "k8s", "--k8s-api-url", fake.url, "--k8s-namespace", fake.namespace]
    flags += ["--health-interval", "0.2", "--policy", "round_robin"]
    process = ServerProcess(model_dir, tmp_path / "router.log", flags, subcommand="router").start()
    started.append(process)
    router = Router(process)
    # Healthy to the router's own checks, but not listed ready: nothing goes to w2.
    router.wait(lambda ws: ws[url1]["ready"] and ws[url2]["healthy"], "w2 to be checked")
    w2_before = computed(w2)
    with Flow(process) as flow:
        flow.wait_done(6)
        assert router.workers()[url2]["num_requests"] == 0 and computed(w2) == w2_before

        # w2 passes its probe: it is added to the rotation.
        listing(("127.0.0.1", True, False), ("127.0.0.2", True, False))
        router.wait(lambda ws: ws[url2]["num_requests"] > 0, "requests on w2")

        # w1 drains (SIGTERM; the kubelet marks it terminating): no new requests, its own finish.
        w1.terminate()
        listing(("127.0.0.1", False, True), ("127.0.0.2", True, False))
        router.wait(lambda ws: not ws[url1]["ready"], "w1 out of the rotation")
        assert w1.process.wait(STREAM_TIMEOUT) == 0
        listing(("127.0.0.2", True, False))
        router.wait(lambda ws: url1 not in ws, "w1 gone")

        # w3 is listed ready before it has loaded its model: routed to only once it answers its checks.
        w3 = worker("127.0.0.3")
        listing(("127.0.0.2", True, False), ("127.0.0.3", True, False))
        router.wait(lambda ws: url3 in ws, "w3 discovered")
        router.wait(lambda ws: ws[url3]["num_requests"] > 0, "requests on w3")

        # w2 is killed while requests stream from it.
        before = router.workers()[url2]["num_requests"]
        router.wait(lambda ws: ws[url2]["num_requests"] > before, "a request on w2")
        os.kill(w2.process.pid, signal.SIGKILL)
        router.wait(lambda ws: not ws[url2]["ready"], "w2 out of the rotation")
        listing(("127.0.0.2", False, False), ("127.0.0.3", True, False))
        flow.wait_done(4)
    assert w3.process.poll() is None
    failures = [o for o in flow.outcomes if not (o.finish_reason == "length" and o.tokens == MAX_TOKENS)]
    # Only requests already streaming from the killed worker fail (it had their 200): nothing was
    # refused that another worker could have taken, and no stream ended silently.
    for outcome in failures:
        assert outcome.status == 200 and outcome.error is not None and url2 in outcome.error, outcome
    assert len(failures) <= 2  # two requests in flight at a time
    assert len(flow.outcomes) - len(failures) >= 10
    metrics = process.metrics()
    assert metrics['duoserve:router_ready_workers{role="both"}'] == 1
