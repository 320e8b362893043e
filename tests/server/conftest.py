"""Fixtures of the server tests: the tiny model directory (once per session) and servers (per module)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import save_tiny_model, tiny_hf_model
from tests.server.harness import CHAT_TEMPLATE, ServerProcess, engine_flags


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    pytest.importorskip("transformers")  # builds the random model
    directory = tmp_path_factory.mktemp("server-model")
    save_tiny_model(tiny_hf_model("llama_gqa"), directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return str(directory)


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
