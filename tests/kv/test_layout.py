"""KVLayout names a quantized cache's storage dtype and scale mode: holders of blocks of another scheme
never take them (P/D: tests/disagg/test_kv_transfer.py; the offload tiers: here), and blocks offloaded
and loaded back keep their row scales."""

from __future__ import annotations

import msgspec
import torch

from duoserve.kv.cache import KVCacheSpec
from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt


def test_layout_names_dtype_and_scale_mode(tmp_path):
    plain = KVLayout.of(KVCacheSpec(2, 2, 8, 4, torch.bfloat16))
    assert (plain.dtype, plain.kv_scales) == ("bfloat16", "")
    spec = KVCacheSpec(2, 2, 8, 4, torch.float8_e4m3fn)
    layout = KVLayout.of(spec)
    assert (layout.dtype, layout.kv_scales) == ("float8_e4m3fn", "token:float16")
    assert layout.torch_dtype == torch.float8_e4m3fn
    # Rows of 8 one-byte values and a 2-byte scale: what export_blocks gives.
    assert layout.shape(3) == (2, 2, 3, 4, 2, 8 + 2)
    assert layout.nbytes(3) == 2 * 2 * 3 * 4 * 2 * (8 + 2) == 3 * spec.bytes_per_block
    assert plain.nbytes(3) == 3 * KVCacheSpec(2, 2, 8, 4, torch.bfloat16).bytes_per_block
    # An older duoserve's static scales named their digest here: another layout.
    other = msgspec.structs.replace(layout, kv_scales="0123456789abcdef")
    assert other != layout
    # The offload tiers' fingerprint carries the layout: blocks of other scales are another set of files.
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    assert (
        KVFingerprint.of(str(model), layout, "float32").digest
        != KVFingerprint.of(str(model), other, "float32").digest
    )


def test_offloaded_quantized_blocks_come_back_with_their_scales(tiny_models, tmp_path, single_torch_thread):
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
    llm.close()

    # Loaded back from disk (rows and their scales): the same greedy tokens as computed afresh.
    restarted = LLM(**args, kv_offload_dir=str(tmp_path / "kv"))
    assert run(restarted, prompts[:1]) == expected[:1]
    stats = restarted.engine.core.stats()
    assert stats.get("kv_offload_hits:disk", 0) > 0, stats
    restarted.close()
