"""A real `duoserve serve` process on a free port, and what the server tests share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for

# The tiny models' word tokenizer has no chat template: this one spells each role as a word of its vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)
# Engine arguments of every test server (and of the offline LLM they are compared with).
ENGINE_ARGS = {"num_kv_blocks": 64, "block_size": 4, "dtype": "float32", "device": "cpu", "num_threads": 1}
READY_TIMEOUT = 300.0  # a deadline, not a measure: model and kernel loading crawl on a loaded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_flags(**overrides) -> list[str]:
    flags = []
    for name, value in {**ENGINE_ARGS, **overrides}.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


@dataclass
class ServerProcess:
    """`duoserve serve MODEL ...` in a subprocess; its output goes to a log file shown on failure."""

    model: str
    log_path: Path
    args: list[str] = field(default_factory=list)
    api_key: str | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    subcommand: str = "serve"  # or "up": a router in front of its own workers
    host: str = "127.0.0.1"  # any of 127.0.0.0/8: workers of one port on several loopback addresses

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, wait: bool = True) -> ServerProcess:
        """Start it and (unless `wait` is false) wait until it is ready."""
        command = [
            sys.executable,
            "-m",
            "duoserve.cli",
            self.subcommand,
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "DUOSERVE_API_KEY"}
        if self.api_key:
            command += ["--api-key", self.api_key]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/ready", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server was not ready after {READY_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name: value}; labels other than model_name/engine go in the key:
        'duoserve:request_success_total{finished_reason="stop"}'."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", headers=self.headers, timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                extra = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
                key = sample.name + (
                    "{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}" if extra else ""
                )
                samples[key] = sample.value
        return samples


def wait_for_metrics(server: ServerProcess, condition, what: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until `condition(metrics)` holds (the state the test needs, not a fixed time) and
    return those metrics; the timeout is a deadline that fails the test."""
    seen: dict[str, float] = {}

    def check() -> dict[str, float] | None:
        seen.clear()
        seen.update(server.metrics())
        return dict(seen) if condition(seen) else None

    try:
        return wait_for(check, timeout, what)
    except pytest.fail.Exception:
        pytest.fail(f"timed out waiting for {what}: {seen}")
