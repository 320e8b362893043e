"""The Triton backend against plain attention and the torch backend: paged decodes (GQA groups, odd block
sizes, head sizes 64 and 128, contexts split over several programs, sliding windows that must not read
freed blocks, soft-capped scores), mixed decode + prefill steps (chunks with and without cached context),
the KV store, and whole engines whose greedy outputs must equal the torch backend's.

Without a GPU these run in Triton's interpreter (tests/attention/conftest.py sets TRITON_INTERPRET): it
runs programs one by one in numpy, so the shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.engine.model_runner import SeqChunk, layout_batch
from tests.attention.test_torch_backend import _reference, poisoned_case, rel_err

pytest.importorskip("triton")
kernels = pytest.importorskip("duoserve.attention.triton_kernels")
from duoserve.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels.INTERPRETED:
    pytest.skip(
        "triton's kernels were defined outside its interpreter: no GPU to run them", allow_module_level=True
    )
pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Tiles small enough that the tiny contexts here take several key iterations and query tiles, and large
# enough to keep the interpreter's programs few (each of its operations costs the same at any tile size).
SMALL = kernels.Tiles(
    decode_block_n=32, prefill_rows=32, prefill_block_n=32, target_programs=8, store_tokens=4
)


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _decode(q, k_pool, v_pool, tables, lens, *, num_splits=None, fused=True, **variant):
    """fused: split decodes reduced by their last split (counters given), else by the reduction kernel."""
    q, k_pool, v_pool, tables, lens = _on(DEVICE, q, k_pool, v_pool, tables, lens)
    out = torch.full_like(q, float("nan"))  # every row must be written
    counters = torch.zeros(q.shape[0] * k_pool.shape[2], dtype=torch.int32, device=DEVICE) if fused else None
    kernels.paged_decode(
        out,
        q,
        k_pool,
        v_pool,
        tables,
        lens,
        q.shape[-1] ** -0.5,
        SMALL,
        num_splits=num_splits,
        split_counters=counters,
        **variant,
    )
    assert counters is None or not counters.any()  # left at 0 for the next launch
    return out.cpu()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "kv_dtype", "q_dtype", "tolerance"),
    [
        (8, 2, 64, 5, torch.float32, torch.float32, 1e-5),  # group 4, a block size that splits tiles
        (4, 4, 128, 16, torch.float32, torch.float32, 1e-5),  # MHA, head size 128
        (6, 2, 64, 7, torch.bfloat16, torch.bfloat16, 1e-2),  # bf16 cache and model: bf16 output
        (8, 1, 128, 3, torch.float16, torch.float32, 1e-5),  # group 8, an fp16 cache under an fp32 model
    ],
)
def test_decode_matches_per_sequence_attention(
    heads, kv_heads, dim, block_size, kv_dtype, q_dtype, tolerance
):
    lens = [1, block_size, 2 * block_size + 1, 37, 64]
    q, k_pool, v_pool, tables, lens_t = poisoned_case(heads, kv_heads, dim, block_size, lens, None)
    k_pool, v_pool, q = k_pool.to(kv_dtype), v_pool.to(kv_dtype), q.to(q_dtype)
    ref = _reference(q.float(), k_pool.float(), v_pool.float(), tables, lens_t, dim**-0.5)
    # One program per (sequence, KV head); keys split over 3 (some splits empty), reduced by the last
    # split or by the reduction kernel.
    for num_splits, fused in ((1, True), (3, True), (3, False)):
        out = _decode(q, k_pool, v_pool, tables, lens_t, num_splits=num_splits, fused=fused)
        assert out.dtype == q_dtype and torch.isfinite(out).all()
        assert rel_err(out, ref) < tolerance, (num_splits, fused)


@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_decode_window_and_soft_cap(soft_cap):
    """Table entries before each window name a NaN block: reading one outside the window gives NaN."""
    lens = [1, 3, 5, 6, 21, 40, 97]
    for window, num_splits in ((1, 2), (7, 1), (21, 2), (1000, 1)):
        q, k_pool, v_pool, tables, lens_t = poisoned_case(6, 2, 64, 5, lens, window)
        ref = _reference(q, k_pool, v_pool, tables, lens_t, 0.125, window, soft_cap)
        out = _decode(
            q,
            k_pool,
            v_pool,
            tables,
            lens_t,
            num_splits=num_splits,
            sliding_window=window,
            logits_soft_cap=soft_cap,
        )
        assert rel_err(out, ref) < 1e-5, window


def test_large_scores_do_not_overflow():
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 2, 64, 16, [200, 37], None)
    q = q * 30
    ref = _reference(q, k_pool, v_pool, tables, lens, 0.125)
    for fused in (True, False):
        out = _decode(q, k_pool, v_pool, tables, lens, num_splits=4, fused=fused)
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5


def test_splits_depend_on_shapes_only():
    """Few sequences over long tables split; a full GPU's worth of programs, or short tables, do not."""
    assert kernels.decode_splits(1, 2, 1024, SMALL) == 4
    assert kernels.decode_splits(8, 1, 1024, SMALL) == 1
    assert kernels.decode_splits(1, 1, 32, SMALL) == 1  # fewer than two key tiles per split otherwise
    gpu = kernels.Tiles(decode_block_n=32, prefill_rows=64, prefill_block_n=64, target_programs=528)
    assert kernels.decode_splits(1, 8, 1024, gpu) == 16  # batch 1 of a 1B Llama: 16 splits of 64 keys
    assert kernels.decode_splits(64, 8, 1024, gpu) == 2
    assert kernels.decode_splits(256, 8, 1024, gpu) == 1


def _mixed_step(heads, kv_heads, dim, block_size, dtype, seed=0):
    """Three decodes, a chunk that starts its sequence, and two chunks over cached context (one starting
    mid-block), in shuffled distinct blocks of a random pool; and the step's new q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (4, 1),
        (block_size * 3, 1),
        (37, 1),
        (0, 6),
        (2 * block_size + 2, 9),
        (block_size, 2 * block_size),
    ]
    num_blocks = sum(-(-(s + n) // block_size) for s, n in shapes) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    chunks = []
    for start, n in shapes:
        count = -(-(start + n) // block_size)
        chunks.append(SeqChunk([0] * n, start, perm[:count]))
        perm = perm[count:]
    layout = layout_batch(chunks, block_size, torch.device("cpu"))
    num_tokens = layout.input_ids.shape[0]
    pools = [torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype) for _ in range(2)]
    qkv = [torch.randn(num_tokens, h, dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads)]
    return layout.meta, pools, qkv


def _meta_on(meta: AttentionMetadata, device) -> AttentionMetadata:
    prefills = [
        type(c)(c.query_start, c.query_len, c.context_len, c.block_table.to(device)) for c in meta.prefills
    ]
    return AttentionMetadata(
        meta.slot_mapping.to(device),
        meta.num_decode_tokens,
        meta.decode_block_tables.to(device),
        meta.decode_context_lens.to(device),
        prefills,
        meta.block_size,
    )


def _run_step(backend, meta, pools, qkv, device, **variant):
    meta = _meta_on(meta, device)
    pools = tuple(p.clone().to(device) for p in pools)
    q, k, v = _on(device, *qkv)
    backend.prepare(meta)
    out = backend.forward(q, k, v, pools, meta, q.shape[-1] ** -0.5, **variant)
    return out.cpu(), [p.cpu() for p in pools]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "dtype", "tolerance", "window", "soft_cap"),
    [
        (8, 2, 64, 5, torch.float32, 1e-5, None, None),
        (4, 4, 128, 16, torch.float32, 1e-5, 6, None),
        (6, 2, 64, 7, torch.bfloat16, 2e-2, None, 2.5),
        (8, 2, 64, 5, torch.float32, 1e-5, 6, 2.5),
    ],
)
def test_mixed_step_matches_torch_backend(
    heads, kv_heads, dim, block_size, dtype, tolerance, window, soft_cap
):
    """Decode rows and prefill chunks in one step: the outputs, and the pools the step's K/V went into."""
    meta, pools, qkv = _mixed_step(heads, kv_heads, dim, block_size, dtype)
    variant = {"sliding_window": window, "logits_soft_cap": soft_cap}
    ref, ref_pools = _run_step(TorchAttentionBackend(), meta, pools, qkv, torch.device("cpu"), **variant)
    backend = TritonAttentionBackend(DEVICE)
    backend._tiles = SMALL
    out, out_pools = _run_step(backend, meta, pools, qkv, DEVICE, **variant)
    for ours, theirs in zip(out_pools, ref_pools, strict=True):
        assert torch.equal(ours, theirs)  # the store writes exactly the step's slots
    assert rel_err(out, ref.double()) < tolerance


def test_store_skips_padded_rows():
    """Slot -1 (a padded row of a captured decode batch) writes nothing; the others land in their slot."""
    k_pool, v_pool = torch.zeros(2, 3, 5, 2, 16, device=DEVICE)
    k, v = torch.randn(2, 3, 2, 16, device=DEVICE)
    kernels.store_kv(k, v, k_pool, v_pool, torch.tensor([7, -1, 0], device=DEVICE), tokens_per_program=2)
    expected = torch.zeros(15, 2, 16, device=DEVICE)
    expected[7], expected[0] = k[0], k[2]
    assert torch.equal(k_pool.view(15, 2, 16), expected)
    assert torch.equal(v_pool.view(15, 2, 16)[7], v[0]) and v_pool.view(15, 2, 16)[1:7].abs().sum() == 0


def test_bad_variants_raise():
    backend = TritonAttentionBackend(DEVICE)
    meta, pools, qkv = _mixed_step(4, 2, 64, 5, torch.float32)
    with pytest.raises(ValueError, match="sliding_window"):
        _run_step(backend, meta, pools, qkv, DEVICE, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        _run_step(backend, meta, pools, qkv, DEVICE, logits_soft_cap=-1.0)


# ------------------------------------------------------------------ the whole engine


def test_engine_greedy_outputs_equal_torch_backend(tiny_models):
    """LLM(attention_backend="triton") on a tiny GQA Llama: chunked prefills next to decodes, odd blocks;
    its layers' norms and RoPE in Triton kernels too; and with async scheduling, CUDA's default (each step's
    tokens fed to the next from the device)."""
    pytest.importorskip("transformers")
    from duoserve.llm import LLM
    from duoserve.sampling_params import SamplingParams
    from tests.helpers import random_prompt

    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(n, seed=n) for n in (4, 13)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outputs = {}
    for backend, async_scheduling in (("torch", False), ("triton", False), ("triton-async", True)):
        llm = LLM(
            model=path,
            attention_backend=backend.removesuffix("-async"),
            async_scheduling=async_scheduling,
            device=DEVICE.type,
            dtype="float32",
            block_size=5,
            num_kv_blocks=32,
            max_num_batched_tokens=9,
        )
        triton = backend != "torch"
        assert type(llm.engine.core.model.attention).__name__ == (
            "TritonAttentionBackend" if triton else "TorchAttentionBackend"
        )
        # With Triton's attention the norms and RoPE run in Triton too (duoserve/models/triton_ops.py).
        assert llm.engine.core.model.fused_ops == triton
        assert llm.engine.core.async_scheduling == async_scheduling
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"] == outputs["triton-async"]
    assert all(len(tokens) == 5 for tokens in outputs["triton"])
