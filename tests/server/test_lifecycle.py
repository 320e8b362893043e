"""The server's life: SIGTERM drains in-flight requests then exits 0; a model that does not load and an
engine process that dies both end the server with a non-zero status and the reason."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from tests.helpers import random_prompt
from tests.server.harness import engine_flags, free_port

# Tokens per sequence: the requests in flight must outlast the test's checks by a wide margin on any
# machine (240 tokens of the tiny model take ~0.15 s on a fast host), so the servers raise the context.
LONG = 1000
DEADLINE = 60.0  # generous: a wait returns as soon as its condition holds


def stream_body(model: str, **extra) -> dict:
    return {
        "model": model,
        "prompt": random_prompt(8, seed=7),
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(start_server):
    # One seat in the running batch: the four sequences run one after another, 4 x 1000 decode steps.
    server = start_server(
        "--shutdown-timeout", "60", "--max-model-len", "1024", num_kv_blocks=512, max_num_seqs=1
    )
    body = stream_body(server.model, n=4)
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        server.terminate()
        # Draining: not ready any more (readiness probes and routers stop sending), no new request
        # admitted, but the one in flight goes on, and the process is alive.
        deadline = time.monotonic() + DEADLINE
        while httpx.get(f"{server.base_url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
            time.sleep(0.01)
        assert httpx.get(f"{server.base_url}/ready").status_code == 503
        assert httpx.get(f"{server.base_url}/livez").status_code == 200
        in_flight = server.metrics()
        refused = httpx.post(
            f"{server.base_url}/v1/completions", json={"model": server.model, "prompt": "w5"}
        )
        # The refusal came while the request was still in flight (its last sequence not even started).
        assert in_flight["duoserve:num_requests_waiting"] >= 1
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        events = [line.removeprefix("data: ") for line in [first, *lines] if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    finishes = {
        c["index"]: c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]
    }
    assert finishes == {i: "length" for i in range(4)}
    assert chunks[-1]["usage"]["completion_tokens"] == 4 * LONG
    assert server.process.wait(30) == 0
    assert "draining" in server.log()


def test_a_model_that_does_not_load_ends_the_server_with_the_reason(tmp_path):
    command = [
        sys.executable,
        "-m",
        "duoserve.cli",
        "serve",
        str(tmp_path / "missing"),
        "--port",
        str(free_port()),
    ]
    result = subprocess.run([*command, *engine_flags()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "missing" in result.stderr and "Traceback" not in result.stderr


def test_a_dead_engine_fails_in_flight_requests_and_ends_the_server(start_server):
    server = start_server("--max-model-len", "1024", num_kv_blocks=512)
    engine_pid = int(re.search(r"engine process (\d+) started", server.log()).group(1))
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=stream_body(server.model), timeout=60
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(engine_pid, signal.SIGKILL)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "engine" in error["message"]
    assert server.process.wait(30) == 1
