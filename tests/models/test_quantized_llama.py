"""A tiny random Llama stored as a GGUF of K-quants (and the other block types) runs on its codes, and its
logits match transformers on the same weights dequantized by gguf's rules."""

from __future__ import annotations

import math

import pytest
import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.models.linear import Int4Linear, Int8Linear, QuantizedEmbedding, StackedLinear
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel, load_model
from tests.helpers import rel_err
from tests.models.families import LLAMA_FFN as FFN
from tests.models.families import LLAMA_HEADS as HEADS
from tests.models.families import LLAMA_HIDDEN as HIDDEN
from tests.models.families import LLAMA_KV_HEADS as KV_HEADS
from tests.models.families import LLAMA_LAYERS as LAYERS
from tests.models.families import LLAMA_VOCAB as VOCAB
from tests.models.families import write_llama_gguf

transformers = pytest.importorskip("transformers")

# Every supported block type somewhere, and Q4_K_M's mix (Q4_K Q/K with a Q6_K V) in layer 0.
TYPES = {
    "token_embd.weight": "Q4_K",
    "output.weight": "Q6_K",
    "blk.0.attn_q.weight": "Q4_K",
    "blk.0.attn_k.weight": "Q4_K",
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q5_K",
    "blk.0.ffn_gate.weight": "Q4_0",
    "blk.0.ffn_up.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q3_K",
    "blk.1.attn_q.weight": "Q2_K",
    "blk.1.attn_k.weight": "Q5_0",
    "blk.1.attn_v.weight": "Q5_1",
    "blk.1.attn_output.weight": "IQ4_NL",
    "blk.1.ffn_gate.weight": "Q8_0",
    "blk.1.ffn_up.weight": "Q4_K",
    "blk.1.ffn_down.weight": "Q6_K",
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    return load_model(str(write_llama_gguf(tmp_path_factory.mktemp("kquants") / "tiny.gguf", TYPES)))


@pytest.fixture(scope="module")
def hf_model(loaded: LoadedModel):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(loaded.dense_weights(torch.float32), strict=True)
    return model


def _logits(model: LlamaModel, token_ids: list[int]) -> torch.Tensor:
    """float32 logits of every position of one sequence, prefilled in one step."""
    n, block_size = len(token_ids), 16
    blocks = math.ceil(n / block_size)
    spec = KVCacheSpec.for_model(model.config, block_size, model.dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[PrefillChunk(0, n, n, torch.arange(blocks))],
        block_size=block_size,
    )
    hidden = model.forward(
        torch.tensor(token_ids), torch.arange(n), KVCache(spec, blocks, torch.device("cpu")), meta
    )
    return model.compute_logits(hidden)


def _model(loaded: LoadedModel, dtype: torch.dtype, quantized: bool) -> LlamaModel:
    return LlamaModel(
        loaded.config,
        loaded.weights,
        TorchAttentionBackend(),
        torch.device("cpu"),
        dtype,
        max_positions=64,
        quantized=loaded.quantized if quantized else None,
    )


PROMPTS = {"decode-sized": [5, 17, 300, 2, 99], "prefill-sized": list(range(3, 300, 13))}


def test_loads_without_a_dense_copy(loaded: LoadedModel):
    assert {w.type_name for w in loaded.quantized.values()} == set(TYPES.values())
    assert len(loaded.quantized) == len(TYPES)  # only the norms are dense


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_float32_dense_matches_transformers(loaded, hf_model, prompt):
    ours = _logits(_model(loaded, torch.float32, quantized=False), prompt)
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0]
    assert rel_err(ours, reference) < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_bfloat16_on_the_codes_stays_close(loaded, hf_model, prompt):
    model = _model(loaded, torch.bfloat16, quantized=True)
    layer0, layer1 = model.layers
    assert type(model.embed) is QuantizedEmbedding
    assert type(layer0.qkv) is StackedLinear  # Q4_K Q/K (int4) + Q6_K V (int8)
    assert [type(p) for p in layer0.qkv.parts] == [Int4Linear, Int8Linear]
    assert type(layer0.mlp.gate_up) is Int4Linear and type(layer1.mlp.down_proj) is Int8Linear
    ours = _logits(model, prompt)
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0]
    # bfloat16 alone is about 1% off here; int8's per-row re-quantization of the types without a kernel
    # of their own (their random sub-scales spread more than a real file's) adds about as much again.
    assert rel_err(ours, reference) < 3e-2
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_float32_on_the_codes_takes_the_activations_setting(loaded):
    """float32 models multiply the codes with duoserve's kernels; `quantized_activations` reaches every
    one of them, and int8's logits stay close to int16's on a decode-sized step."""
    if not cpu_kernels_available():
        pytest.skip("the C++ kernels did not build")
    logits = {}
    for activations in ("int16", "int8"):
        model = LlamaModel(
            loaded.config,
            loaded.weights,
            TorchAttentionBackend(),
            torch.device("cpu"),
            torch.float32,
            max_positions=64,
            quantized=loaded.quantized,
            quantized_activations=activations,
        )
        linears = [model.lm_head] + [lin for layer in model.layers for lin in layer.linears()]
        parts = [part for lin in linears for part in getattr(lin, "parts", [lin])]
        assert {part.activations for part in parts} == {activations}
        logits[activations] = _logits(model, PROMPTS["decode-sized"])
    assert not torch.equal(logits["int8"], logits["int16"])
    assert rel_err(logits["int8"], logits["int16"]) < 2e-2
