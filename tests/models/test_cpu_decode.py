"""The one-call CPU decode loop (models/cpu_decode.py) gives the Python layers' results bit for bit, runs
only where every part of the model and step is one it covers, and leaves the rest to the layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.attention.cpu_backend import CpuAttentionBackend
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.models.cpu_decode import CpuDecodeLayers
from duoserve.models.cpu_quant_linear import CpuQ4Linear, CpuQ8Linear
from duoserve.models.linear import DenseLinear, Int4Linear, Int8Linear
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel, load_model
from tests.models.families import LLAMA_LAYERS, write_llama_gguf

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="duoserve's CPU kernels are not built")

BLOCK = 16
# Each fused projection's parts share a format (else StackedLinear, which the loop leaves out); the two
# layers give every linear both 4-bit and 8-bit kernels.
TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q8_0",
    **{f"blk.0.attn_{p}.weight": "Q4_1" for p in "qkv"},
    "blk.0.attn_output.weight": "Q8_0",
    "blk.0.ffn_gate.weight": "Q4_0",
    "blk.0.ffn_up.weight": "Q4_0",
    "blk.0.ffn_down.weight": "Q6_K",
    **{f"blk.1.attn_{p}.weight": "Q8_0" for p in "qkv"},
    "blk.1.attn_output.weight": "Q4_K",
    "blk.1.ffn_gate.weight": "Q4_1",
    "blk.1.ffn_up.weight": "Q4_1",
    "blk.1.ffn_down.weight": "Q4_0",
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    return load_model(str(write_llama_gguf(tmp_path_factory.mktemp("cpu_decode") / "tiny.gguf", TYPES)))


def _model(loaded: LoadedModel, quantized: bool, attention=None, dtype=torch.bfloat16) -> LlamaModel:
    return LlamaModel(
        loaded.config,
        loaded.weights,
        attention or CpuAttentionBackend(),
        torch.device("cpu"),
        dtype,
        max_positions=256,
        quantized=loaded.quantized if quantized else None,
    )


def _prefill(
    prompts: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
    """Every prompt prefilled in one step, sequence i in blocks 8i.. (8 blocks each)."""
    tables = [torch.arange(8 * i, 8 * i + 8) for i in range(len(prompts))]
    ids, positions, slots, chunks, start = [], [], [], [], 0
    for prompt, table in zip(prompts, tables, strict=True):
        n = len(prompt)
        ids += prompt
        positions += range(n)
        slots += [int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in range(n)]
        chunks.append(PrefillChunk(start, n, n, table))
        start += n
    meta = AttentionMetadata(
        torch.tensor(slots),
        0,
        torch.zeros(0, 1, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        chunks,
        BLOCK,
    )
    return torch.tensor(ids), torch.tensor(positions), meta, tables


def _decode(tokens: list[int], lens: list[int], tables: list[torch.Tensor]):
    """One decode step: sequence i's next token at position lens[i]."""
    slots = [int(t[n // BLOCK]) * BLOCK + n % BLOCK for n, t in zip(lens, tables, strict=True)]
    meta = AttentionMetadata(
        torch.tensor(slots),
        len(tokens),
        torch.stack(tables),
        torch.tensor([n + 1 for n in lens]),
        [],
        BLOCK,
    )
    return torch.tensor(tokens), torch.tensor(lens), meta


def _run(model: LlamaModel, loop: bool, prompts: list[list[int]], steps: int):
    """Prefill, then `steps` greedy decode steps; the hidden states of each step and the KV cache."""
    model.cpu_decode_layers = loop
    spec = KVCacheSpec.for_model(model.config, BLOCK, model.dtype)
    cache = KVCache(spec, 8 * len(prompts), torch.device("cpu"))
    ids, positions, meta, tables = _prefill(prompts)
    hidden = model.forward(ids, positions, cache, meta)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    states, lens = [hidden], [len(p) for p in prompts]
    for _ in range(steps):
        tokens = model.compute_logits(hidden[ends]).argmax(-1).tolist()
        ids, positions, meta = _decode(tokens, lens, tables)
        hidden = model.forward(ids, positions, cache, meta)
        states.append(hidden)
        ends = torch.arange(len(prompts))
        lens = [n + 1 for n in lens]
    return states, cache.data


PROMPTS = [[5, 17, 300, 2, 99], list(range(3, 300, 13)), [7] * 17]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("quantized", [True, False], ids=["codes", "dense"])
def test_loop_matches_the_layers_bit_for_bit(loaded, quantized, dtype, monkeypatch):
    """Batches of 3 (and 1) decodes across block boundaries: every step's hidden states and the KV cache
    equal the Python layers' exactly, and every decode step ran in the loop. float32 models' codes run
    duoserve's float32 kernels (int16 activations), bfloat16 ones the fused kernels."""
    calls = []
    run_loop = CpuDecodeLayers.__call__
    monkeypatch.setattr(CpuDecodeLayers, "__call__", lambda self, *a: calls.append(1) or run_loop(self, *a))
    model = _model(loaded, quantized, dtype=dtype)
    kinds = {type(linear) for layer in model.layers for linear in layer.linears()}
    if dtype == torch.float32:
        assert kinds == ({CpuQ4Linear, CpuQ8Linear} if quantized else {DenseLinear})
    elif quantized and not (all(linear.fused for layer in model.layers for linear in layer.linears())):
        pytest.skip("the fused 4/8-bit kernels are not built for this CPU")
    else:
        assert kinds == ({Int4Linear, Int8Linear} if quantized else {DenseLinear})
    for prompts in (PROMPTS, PROMPTS[:1]):
        calls.clear()
        looped, looped_cache = _run(model, True, prompts, steps=12)
        assert len(calls) == 12
        layered, layered_cache = _run(model, False, prompts, steps=12)
        assert len(calls) == 12 and model._cpu_decode_loop() is None
        for step, (a, b) in enumerate(zip(looped, layered, strict=True)):
            assert torch.equal(a, b), step
        assert torch.equal(looped_cache, layered_cache)


def test_steps_and_models_it_leaves_to_the_layers(loaded):
    """Prefills, and models with a part the loop leaves out (LoRA slots, the torch backend's decodes, a
    cache of another dtype), run the layers: the loop is never built or never applies."""
    model = _model(loaded, quantized=False)
    loop = model._cpu_decode_loop()
    assert loop is not None
    spec = KVCacheSpec.for_model(model.config, BLOCK, model.dtype)
    cache = KVCache(spec, 8, torch.device("cpu"))
    _, positions, meta, _ = _prefill([[1, 2, 3]])
    cos = loop.rope.cos[positions][:, None, :]
    assert not loop.applies(3, cos, model.attention, cache, meta)  # a prefill
    _, positions, meta = _decode([4], [3], [torch.arange(8)])
    cos = loop.rope.cos[positions][:, None, :]
    assert loop.applies(1, cos, model.attention, cache, meta)
    assert not loop.applies(1, cos, TorchAttentionBackend(), cache, meta)
    int8_cache = KVCache(KVCacheSpec.for_model(model.config, BLOCK, torch.int8), 8, torch.device("cpu"))
    assert not loop.applies(1, cos, model.attention, int8_cache, meta)

    parts = [layer.plain_parts() for layer in model.layers]
    assert CpuDecodeLayers.of(parts) is not None
    # Layers with RoPE tables of their own (Gemma 3's local and global): refused, not compared by value.
    own_table = dataclasses.replace(parts[1], rope=dataclasses.replace(parts[1].rope))
    assert CpuDecodeLayers.of([parts[0], own_table]) is None
    assert CpuDecodeLayers.of([parts[0], None]) is None

    float32_cache = KVCache(KVCacheSpec.for_model(model.config, BLOCK, torch.float32), 8, torch.device("cpu"))
    assert not loop.applies(1, cos, model.attention, float32_cache, meta)  # a bfloat16 model's loop
    float32 = _model(loaded, quantized=False, dtype=torch.float32)._cpu_decode_loop()
    assert float32 is not None and float32.dtype == torch.float32
    assert not float32.applies(1, cos, model.attention, cache, meta)  # bfloat16 pools and table
    assert float32.applies(1, cos.float(), model.attention, float32_cache, meta)
    model.add_lora_slots(max_loras=1, max_rank=4)
    assert model._cpu_decode_loop() is None


def test_loop_holds_each_linear_as_its_kernel_and_range(loaded):
    """10 weights and 4 linear kinds a layer, in the file's formats (Q4_* -> the 4-bit kernel, Q8_0, Q6_K
    -> the 8-bit one; dense bfloat16 without codes), and the rows every one of them runs its kernel at."""
    dense = _model(loaded, quantized=False)._cpu_decode_loop()
    assert (
        dense.weights.kinds() == [16] * 4 * LLAMA_LAYERS and dense.weights.num_weights() == 10 * LLAMA_LAYERS
    )
    assert dense.rows[0] == 1 and dense.rows[1] >= 1 << 20
    model = _model(loaded, quantized=True)
    loop = model._cpu_decode_loop()
    if loop is None:
        pytest.skip("the fused 4/8-bit kernels are not built for this CPU")
    assert loop.weights.kinds() == [4, 8, 4, 8, 8, 4, 4, 4]  # layer 0: qkv, o, gate_up, down; then layer 1
    ranges = [linear.fused_rows for layer in model.layers for linear in layer.linears()]
    assert loop.rows == (max(low for low, _ in ranges), min(high for _, high in ranges))


@pytest.mark.parametrize("activations", ["int16", "int8"])
def test_float32_codes_are_held_as_their_kernel_and_activation_bits(loaded, activations):
    """A float32 model's GGUF codes: Q4_* -> q4_matmul (4xx), Q8_0, Q6_K -> q8_matmul (8xx), xx the
    activation bits; the loop runs the steps up to the linears' threshold (tiles above)."""
    model = _model(loaded, quantized=True, dtype=torch.float32)
    for layer in model.layers:
        for linear in layer.linears():
            linear.activations = activations
    loop = model._cpu_decode_loop()
    bits = {"int16": 16, "int8": 8}[activations]
    assert loop.weights.kinds() == [k + bits for k in (400, 800, 400, 800, 800, 400, 400, 400)]
    assert loop.rows == (1, min(linear.max_rows for layer in model.layers for linear in layer.linears()))
