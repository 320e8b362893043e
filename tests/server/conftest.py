"""Fixtures of the server tests: the tiny model directory (once per session) and servers (per module)."""

from __future__ import annotations

import pytest

from tests.server.harness import ServerProcess, engine_flags


@pytest.fixture(scope="module")
def start_server(model_dir, tmp_path_factory):
    """Start servers for a module (each `start_server(*args)` call starts one); all stop at its end."""
    started: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None, **engine_overrides) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        server = ServerProcess(model_dir, log_path, [*engine_flags(**engine_overrides), *args], api_key)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
