"""EngineCore's use of the host's defaults (duoserve/hardware.py) and of the config's overrides, and a
quantized KV cache through every path that computes a prompt."""

from __future__ import annotations

import pytest

from duoserve import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt


def test_config_overrides_reach_the_model_and_the_startup_line(
    smollm2_gguf_path, single_torch_thread, caplog
):
    """--quantized-max-rows (else the host's threshold) is each quantized linear's, and the startup log
    line gives the host's choices and says which the config replaced."""
    caplog.set_level("INFO", logger="duoserve.engine.core")
    llm = LLM(
        dtype="bfloat16",
        device="cpu",
        attention_backend="torch",
        num_kv_blocks=4,
        block_size=16,
        num_threads=1,
        quantized_max_rows=3,
    )
    qkv = llm.engine.core.model.layers[0].qkv
    assert type(qkv).__name__ == "Int4Linear" and qkv.max_rows == 3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("host: ")]
    assert " -> dtype " in line and "attention kernel " in line
    assert line.endswith("; set by the config: dtype bfloat16, num_threads 1, quantized_max_rows 3")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantized_kv_gives_one_answer_however_the_prompt_is_computed(
    kv_cache_dtype, tiny_models, single_torch_thread
):
    """Chunked prefill, prefix-cache hits and recomputation after preemption all read the same quantized
    K/V as one unchunked run per prompt: the greedy tokens are the same."""
    path = tiny_models("llama_gqa")[1]
    args = dict(model=path, device="cpu", dtype="float32", block_size=4, kv_cache_dtype=kv_cache_dtype)
    shared = random_prompt(18, seed=7)
    prompts = [shared + random_prompt(n, seed=8 + n) for n in (5, 3, 9)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    whole = LLM(**args, num_kv_blocks=128, enable_prefix_caching=False)
    expected = [whole.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    # 14 blocks of 4: the three requests (~28-34 tokens each) cannot all stay; chunks of 7 tokens.
    llm = LLM(**args, num_kv_blocks=14, max_num_batched_tokens=7)
    first = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    rest = [o.outputs[0].token_ids for o in llm.generate(prompts[1:], params, use_tqdm=False)]
    core = llm.engine.core
    assert core.kv_cache.data.dtype == core.kv_cache.spec.dtype and core.kv_cache.spec.quantized
    assert core.kv.prefix_cache_hits > 0 and core.scheduler.num_preemptions > 0
    assert [first, *rest] == expected
