"""The families beyond Llama (Qwen3, Qwen3-MoE, Mixtral, Gemma 2/3, Phi-3) against transformers, fp32.

Through the engine: every computed position's logits (relative error < 1e-4) and greedy tokens equal
to transformers' `generate`, across a mixed batch, chunked prefill, a prefix-cache hit and
preemption; from the HF directory and from a GGUF written as llama.cpp writes each family.
"""

from __future__ import annotations

import pytest
import torch

from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.llm import LLM
from duoserve.models.config import ModelConfig
from duoserve.models.linear import Int8Linear
from duoserve.models.llama import LlamaModel, rope_inv_freq
from duoserve.models.loader import load_model
from duoserve.models.moe import MoE
from duoserve.sampling_params import SamplingParams
from tests.helpers import EngineRecorder, hf_greedy, random_prompt, save_tiny_model
from tests.models.families import FAMILIES, LONGROPE_ORIGINAL, family_model, write_family_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """kind -> (transformers model, HF directory with a tokenizer), built once per module."""
    cache: dict[str, tuple[object, str]] = {}

    def get(kind: str):
        if kind not in cache:
            model = family_model(kind)
            cache[kind] = (model, save_tiny_model(model, tmp_path_factory.mktemp(kind)))
        return cache[kind]

    return get


def make_llm(path: str, **engine_args) -> tuple[LLM, EngineRecorder]:
    args = dict(num_kv_blocks=128, block_size=4, max_num_batched_tokens=16, dtype="float32", device="cpu")
    llm = LLM(model=path, **{**args, **engine_args})
    return llm, EngineRecorder(llm.engine.core)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def generate_ids(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(max_tokens), use_tqdm=False)]


def check_engine(hf, path: str, base: int = 0, **engine_args) -> None:
    """A mixed batch under a 16-token budget (chunked prefill, decodes beside prefill chunks), then a
    prompt sharing 12 tokens with the first one (a prefix-cache hit); `base` lengthens every prompt."""
    llm, recorder = make_llm(path, **engine_args)
    shared = random_prompt(base + 12, seed=1)
    prompts = [
        shared + random_prompt(5, seed=2),
        random_prompt(base + 3, seed=3),
        random_prompt(base + 9, seed=4),
    ]
    outputs = generate_ids(llm, prompts, 7)
    assert all(sum(n for _, _, n in step.chunks) <= 16 for step in recorder.steps)
    assert any(len(step.chunks) > 1 and any(n == 1 for *_, n in step.chunks) for step in recorder.steps)
    follow_up = shared + random_prompt(4, seed=5)
    outputs += generate_ids(llm, [follow_up], 5)
    assert llm.engine.core.kv.prefix_cache_hits >= 12
    prompts.append(follow_up)
    for prompt, out, n in zip(prompts, outputs, [7, 7, 7, 5], strict=True):
        assert out == hf_greedy(hf, prompt, n)
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


@pytest.mark.parametrize("kind", FAMILIES)
def test_engine_matches_transformers(kind: str, family_models) -> None:
    hf, path = family_models(kind)
    # Phi-3: the engine's context (256) is past the pretraining one (32), so it runs LongRoPE's long
    # factors; transformers does too for sequences longer than 32.
    check_engine(hf, path, base=LONGROPE_ORIGINAL + 1 if kind == "phi3" else 0)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gemma2"])
def test_preemption_recomputes_and_matches(kind: str, family_models) -> None:
    hf, path = family_models(kind)
    # 12 blocks of 4 = 48 tokens; three requests of 10 + 16 tokens need 21 blocks together.
    llm, recorder = make_llm(path, num_kv_blocks=12)
    prompts = [random_prompt(10, seed=40 + i) for i in range(3)]
    outputs = generate_ids(llm, prompts, 16)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert any(len(v) > 1 for v in recorder.logits.values())  # recomputed positions, both times right
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == hf_greedy(hf, prompt, 16)
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


def test_phi3_short_context_uses_short_factors(family_models) -> None:
    """An engine whose context fits the pretraining one runs the short factors, as transformers does
    for sequences that fit it."""
    hf, path = family_models("phi3")
    check_engine(hf, path, max_model_len=LONGROPE_ORIGINAL)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe_norm", "mixtral", "gemma2", "gemma3", "phi3"])
def test_engine_from_gguf(kind: str, family_models, tmp_path) -> None:
    """The same model written as llama.cpp's converter writes it (F32) gives the same answers."""
    hf, path = family_models(kind)
    gguf_path = write_family_gguf(tmp_path / f"{kind}.gguf", kind, hf)
    loaded = load_model(str(gguf_path))
    assert loaded.config.architecture == hf.config.model_type
    llm, recorder = make_llm(str(gguf_path))
    base = LONGROPE_ORIGINAL + 1 if kind == "phi3" else 0
    prompts = [random_prompt(base + 14, seed=6), random_prompt(base + 5, seed=7)]
    outputs = generate_ids(llm, prompts, 6)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == hf_greedy(hf, prompt, 6)
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


def test_quantized_gguf_runs_dense_experts(family_models, tmp_path) -> None:
    """A Q8_0 Qwen3-MoE GGUF: attention matrices keep their codes for the quantized kernels, experts
    (3-D) are dequantized and run dense; bfloat16 answers stay close to transformers' fp32 ones."""
    hf, _ = family_models("qwen3_moe_norm")
    path = write_family_gguf(tmp_path / "q8.gguf", "qwen3_moe_norm", hf, gguf.GGMLQuantizationType.Q8_0)
    loaded = load_model(str(path), torch.bfloat16)
    assert "model.layers.0.self_attn.q_proj.weight" in loaded.quantized
    assert not any("experts" in name for name in loaded.quantized)
    experts = loaded.weights["model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(experts, torch.Tensor) and experts.shape == (4, 80, 64)
    model = LlamaModel(
        loaded.config,
        loaded.weights,
        TorchAttentionBackend(),
        torch.device("cpu"),
        torch.bfloat16,
        64,
        quantized=loaded.quantized,
    )
    assert any(isinstance(layer.mlp, MoE) for layer in model.layers)
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            mlp = layer.mlp
            assert all(isinstance(t, torch.Tensor) for t in (mlp.router, mlp.gate_up, mlp.down))
        assert all(isinstance(linear, Int8Linear) for linear in layer.linears())
        assert all(isinstance(norm, torch.Tensor) for norm in layer.norms())
    prompt = random_prompt(9, seed=8)
    logits = _forward_logits(model, prompt)
    ref = hf(torch.tensor([prompt])).logits[0].detach()
    assert torch.corrcoef(torch.stack([logits.flatten(), ref.flatten()]))[0, 1] > 0.99


def _forward_logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    """One prefill of `prompt` through the model alone, in a fresh 1-block-per-4-tokens cache."""
    from duoserve.attention.backend import AttentionMetadata, PrefillChunk

    config = model.config
    blocks = (len(prompt) + 3) // 4
    cache = KVCache(KVCacheSpec.for_model(config, 4, model.dtype), blocks, torch.device("cpu"))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(len(prompt)),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros((0, 1), dtype=torch.int64),
        decode_context_lens=torch.zeros(0, dtype=torch.int64),
        prefills=[PrefillChunk(0, len(prompt), len(prompt), torch.arange(blocks))],
        block_size=4,
    )
    hidden = model.forward(torch.tensor(prompt), torch.arange(len(prompt)), cache, meta)
    return model.compute_logits(hidden)


def test_longrope_matches_transformers_rope_function(family_models) -> None:
    """inv_freq and the attention factor of both regimes, against transformers' own LongRoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, path = family_models("phi3")
    config = load_model(path).config
    for seq_len, max_positions in ((LONGROPE_ORIGINAL, LONGROPE_ORIGINAL), (300, 256)):
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["longrope"](hf.config, None, seq_len=seq_len)
        ours_freq, ours_factor = rope_inv_freq(config, config.rope_theta, config.rope_scaling, max_positions)
        assert torch.equal(ours_freq, ref_freq) and ours_factor == pytest.approx(ref_factor, rel=1e-12)


def test_unsupported_activation_and_rope_type() -> None:
    config = ModelConfig("llama", 10, 8, 8, 1, 2, 2, 4, hidden_act="relu")
    with pytest.raises(ValueError, match="unsupported activation 'relu'; supported: silu, gelu_pytorch_tanh"):
        LlamaModel(config, {}, TorchAttentionBackend(), torch.device("cpu"), torch.float32, 8)
    with pytest.raises(
        ValueError, match="unsupported rope scaling type 'dynamic'; supported: default, linear"
    ):
        rope_inv_freq(config, 1e4, {"rope_type": "dynamic", "factor": 2.0}, 8)


@pytest.mark.parametrize(
    "extra",
    [{}, {"beta_fast": 16, "beta_slow": 2, "truncate": False}, {"mscale": 1.0, "mscale_all_dim": 0.5}],
)
def test_yarn_matches_transformers_rope_function(extra: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 5e5,
        **extra,
    }
    hf = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32, rope_parameters=yarn)
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    config = ModelConfig("qwen3", 10, 64, 8, 1, 4, 4, 32, rope_theta=5e5, rope_scaling=yarn)
    ours_freq, ours_factor = rope_inv_freq(config, 5e5, yarn, 256)
    assert torch.equal(ours_freq, ref_freq) and ours_factor == pytest.approx(ref_factor, rel=1e-12)
