"""Probes as clients and Kubernetes use them: /health (and /v1/models) answer 200 only when a request
would be served, so a client that waits for the 200 is then served, for `serve` and for `up`; /livez
answers whenever the process does; both probes need no API key."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.testclient import TestClient

from duoserve.config import EngineConfig
from duoserve.router.router import RouterClient
from duoserve.router.routing import RouterConfig
from duoserve.server.api import build_app
from duoserve.server.engine_client import EngineClient
from duoserve.server.settings import ServerSettings
from tests.server.harness import READY_TIMEOUT, ServerProcess, engine_flags, free_port

KEY = "probe-key"


def probe(client: EngineClient, api_key: str | None = None) -> TestClient:
    return TestClient(build_app(client, ServerSettings(api_key=api_key), worker_routes=True))


def assert_unavailable(response: httpx.Response, why: str) -> None:
    assert response.status_code == 503
    error = response.json()["error"]
    assert why in error["message"] and error["code"] == 503


def test_not_ready_while_loading_then_draining(model_dir):
    client = EngineClient(EngineConfig(model=model_dir))  # not started: its model is still loading
    http = probe(client, api_key=KEY)
    assert http.get("/livez").status_code == 200  # no key: a kubelet has none
    assert_unavailable(http.get("/health"), "still loading")
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/ready", "/v1/models"):
        assert_unavailable(http.get(path, headers=headers), "still loading")
    asyncio.run(client.drain(0))
    assert_unavailable(http.get("/health"), "shutting down")
    assert http.get("/livez").status_code == 200


def test_a_router_without_a_ready_decode_worker_is_not_ready(model_dir):
    router = RouterClient(model_dir, RouterConfig(decode_urls=[f"http://127.0.0.1:{free_port()}"]))
    http = TestClient(build_app(router, ServerSettings(), worker_routes=False))
    assert http.get("/livez").status_code == 200
    assert_unavailable(http.get("/health"), "no decode (or colocated) worker is ready")
    assert_unavailable(http.get("/v1/models"), "no decode (or colocated) worker is ready")


def race_to_first_request(server: ServerProcess) -> None:
    """Poll /health from the process's start; at its first 200, send a request at once: it is served."""
    deadline = time.monotonic() + READY_TIMEOUT
    seen: list[int] = []
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        while True:
            assert time.monotonic() < deadline, f"not healthy after {READY_TIMEOUT}s:\n{server.log()}"
            if server.process.poll() is not None:
                pytest.fail(f"the server exited:\n{server.log()}")
            try:
                response = http.get("/health")
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            seen.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503 and response.json()["error"]["message"]  # with its reason
            assert http.get("/livez").status_code == 200  # alive meanwhile
            time.sleep(0.01)
        body = {"model": server.model, "prompt": "w5 w6 w7", "max_tokens": 2, "ignore_eos": True}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
        assert http.get("/v1/models").status_code == 200


def test_serve_health_200_is_followed_by_a_served_request(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "serve.log", engine_flags()).start(wait=False)
    try:
        race_to_first_request(server)
    finally:
        server.stop()


def test_up_health_200_is_followed_by_a_served_request(model_dir, tmp_path):
    flags = [*engine_flags(attention_backend="torch"), "--prefill", "1", "--decode", "1"]
    flags.remove("--num-threads")  # `up` gives each worker its share of the cores
    flags.remove("1")
    server = ServerProcess(model_dir, tmp_path / "up.log", flags, subcommand="up").start(wait=False)
    try:
        race_to_first_request(server)
        ready = server.metrics()
        assert ready['duoserve:router_ready_workers{role="decode"}'] == 1
        assert ready["duoserve:router_queued_prefill_tokens"] == 0  # nothing waits for a prefill now
    finally:
        server.stop()
