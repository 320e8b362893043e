"""Static KV scales: calibrated at engine start (the same in every engine of a model), written by
`duoserve kv-scales` and read back with --kv-scales-path."""

from __future__ import annotations

import json

import pytest
import torch

from duoserve.cli import main as cli_main
from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.kv.calibrate import MARGINS, calibration_text, calibration_token_ids, measure_amax
from duoserve.models.loader import load_model
from duoserve.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ARGS = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=4)


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models("llama_gqa")[1]


def make_core(path: str, **overrides) -> EngineCore:
    return EngineCore(EngineConfig(model=path, **{**ARGS, **overrides}), load_model(path, torch.float32))


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_calibrated_scales_cover_the_calibration_amax(model_path, kv_cache_dtype):
    core = make_core(model_path, kv_cache_dtype=kv_cache_dtype)
    spec = core.kv_cache.spec
    ids = calibration_token_ids(None, core.model_config.vocab_size)
    k_amax, v_amax = measure_amax(core.model, ids)  # in pieces of 32 tokens, as the engine does
    top = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[kv_cache_dtype]
    margin = MARGINS[spec.dtype]
    for amax, table in ((k_amax, spec.scales.k), (v_amax, spec.scales.v)):
        reach = torch.tensor(table) * top  # the largest value each (layer, head) can store
        assert (reach >= amax * margin * (1 - 1e-6)).all()
        assert (reach < amax * margin * 2 ** (1 / 16) * 1.001).all()  # rounded up by less than one step
    assert core.kv_cache.k_scales.shape == (2, 3)  # 2 layers x 3 KV heads
    # Another engine of the same model calibrates the same scales: a P/D pair's layouts agree.
    assert (
        make_core(model_path, kv_cache_dtype=kv_cache_dtype, block_size=8).kv_cache.spec.scales == spec.scales
    )


def test_unquantized_cache_has_no_scales(model_path):
    cache = make_core(model_path).kv_cache
    assert cache.spec.scales is None and cache.k_scales is None


def test_calibration_tokens_without_a_tokenizer_that_knows_the_text(model_path):
    """The tests' word-level tokenizer knows none of the text's words: fixed pseudo-random ids instead
    (SmolLM2's own tokenizer encodes the text: benchmarks/kv_accuracy.py calibrates it so)."""
    words = calibration_token_ids(load_tokenizer(model_path), 300, 100)
    assert len(words) == 100 and len(set(words)) > 50
    assert words == calibration_token_ids(None, 300, 100)
    assert "lighthouse" in calibration_text()


def test_kv_scales_command_writes_what_the_engine_reads(model_path, tmp_path):
    path = tmp_path / "scales.json"
    flags = ["--device", "cpu", "--dtype", "float32", "--kv-cache-dtype", "int8", "--block-size", "4"]
    assert cli_main(["kv-scales", model_path, *flags, "-o", str(path)]) == 0
    body = json.loads(path.read_text())
    assert body["kv_cache_dtype"] == "int8" and len(body["k_scale"]) == 2
    calibrated = make_core(model_path, kv_cache_dtype="int8").kv_cache.spec.scales
    loaded = make_core(model_path, kv_cache_dtype="int8", kv_scales_path=str(path)).kv_cache.spec.scales
    assert loaded == calibrated
    # Scales the file gives, not calibrated ones: another file gives another layout digest.
    body["k_scale"][0][0] *= 2
    path.write_text(json.dumps(body))
    other = make_core(model_path, kv_cache_dtype="int8", kv_scales_path=str(path)).kv_cache.spec.scales
    assert other.k[0][0] == 2 * calibrated.k[0][0] and other.digest != calibrated.digest


def test_bad_scales_files_are_refused(model_path, tmp_path):
    path = tmp_path / "scales.json"
    with pytest.raises(ValueError, match="cannot read"):
        make_core(model_path, kv_cache_dtype="int8", kv_scales_path=str(path))
    path.write_text(json.dumps({"kv_cache_dtype": "int8", "k_scale": [[1.0]], "v_scale": [[1.0]]}))
    with pytest.raises(ValueError, match="2 layers x 3 KV heads"):
        make_core(model_path, kv_cache_dtype="int8", kv_scales_path=str(path))
    assert cli_main(["kv-scales", model_path, "--device", "cpu", "--kv-cache-dtype", "auto"]) == 2
