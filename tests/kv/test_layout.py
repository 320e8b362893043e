"""KVLayout names a quantized cache's storage dtype and scales: holders of blocks quantized under other
scales never take them (P/D: tests/disagg/test_kv_transfer.py; the offload tiers: here)."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.cache import KVCacheSpec
from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.kv.quant import KVScales
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

SCALES = KVScales(((0.1, 0.2), (0.3, 0.4)), ((0.5, 0.6), (0.7, 0.8)))
OTHER = KVScales(((0.1, 0.2), (0.3, 0.4)), ((0.5, 0.6), (0.7, 0.9)))


def test_layout_names_dtype_and_scales(tmp_path):
    plain = KVLayout.of(KVCacheSpec(2, 2, 8, 4, torch.bfloat16))
    assert (plain.dtype, plain.kv_scales) == ("bfloat16", "")
    spec = KVCacheSpec(2, 2, 8, 4, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs its scales"):
        KVLayout.of(spec)
    layout = KVLayout.of(spec.with_scales(SCALES))
    assert (layout.dtype, layout.kv_scales) == ("float8_e4m3fn", SCALES.digest)
    assert layout.torch_dtype == torch.float8_e4m3fn
    assert layout.nbytes(3) == plain.nbytes(3) // 2 == 2 * 2 * 3 * 4 * 2 * 8
    other = KVLayout.of(spec.with_scales(OTHER))
    assert other != layout
    # The offload tiers' fingerprint carries the layout: blocks of other scales are another set of files.
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    assert (
        KVFingerprint.of(str(model), layout, "float32").digest
        != KVFingerprint.of(str(model), other, "float32").digest
    )


def test_offloaded_quantized_blocks_come_back_only_under_the_same_scales(
    tiny_models, tmp_path, single_torch_thread
):
    path = tiny_models("llama_gqa")[1]
    args = dict(
        model=path, device="cpu", dtype="float32", block_size=4, num_kv_blocks=12, attention_backend="torch"
    )
    args["kv_cache_dtype"] = "int8"
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [random_prompt(30, seed=s) for s in range(3)]  # each evicts the one before it

    def run(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
        return [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in batch]

    expected = run(LLM(**args), prompts)
    llm = LLM(**args, kv_offload_dir=str(tmp_path / "kv"))
    assert run(llm, prompts) == expected
    assert llm.engine.core.stats()["kv_offload_stores:disk"] > 0
    scales = llm.engine.core.kv_cache.spec.scales
    llm.close()

    restarted = LLM(**args, kv_offload_dir=str(tmp_path / "kv"))
    assert run(restarted, prompts[:1]) == expected[:1]
    stats = restarted.engine.core.stats()
    assert stats.get("kv_offload_hits:disk", 0) + stats.get("kv_offload_loads_declined", 0) > 0
    restarted.close()

    # Same model and dtype, other scales: none of those files is read.
    other = tmp_path / "scales.json"
    other.write_text(KVScales(tuple(tuple(2 * s for s in row) for row in scales.k), scales.v).to_json("int8"))
    foreign = LLM(**args, kv_offload_dir=str(tmp_path / "kv"), kv_scales_path=str(other))
    run(foreign, prompts[:1])
    stats = foreign.engine.core.stats()
    assert stats.get("kv_offload_hits:disk", 0) + stats.get("kv_offload_loads_declined", 0) == 0
    foreign.close()
