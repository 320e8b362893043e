"""The torch backend's batched, padded decode and its prefill chunks against plain attention over each
sequence's context, with and without a sliding window and soft-capped scores; over quantized pools (the
reference for fp8/int8 KV: the CPU backend, which decodes them in its kernel or falls back to this path,
is held to the same)."""

from __future__ import annotations

import pytest
import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.attention.cpu_backend import CpuAttentionBackend, cpu_kernels_available
from duoserve.attention.torch_backend import TorchAttentionBackend, _decode, _decode_groups
from duoserve.attention.triton_backend import TritonAttentionBackend
from duoserve.kv.layer import LayerKV
from duoserve.kv.quant import QUANTIZED_KV_DTYPES, dequantize, quantize

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def plain_attention(q, keys, values, scale, query_positions, window=None, soft_cap=None):
    """q [T, heads, dim] at query_positions over keys/values [S, kv_heads, dim] at positions 0..S-1, in
    float64: a query at p sees keys (p - window, p], as transformers' sliding-window mask."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), keys) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    p = torch.as_tensor(query_positions)[:, None]
    j = torch.arange(keys.shape[0])[None, :]
    hidden = (j > p) if window is None else (j > p) | (j <= p - window)
    scores = scores.masked_fill(hidden, -torch.inf)
    return torch.einsum("hts,shd->thd", scores.softmax(-1), values)


def _reference(q, k_pool, v_pool, tables, lens, scale, window=None, soft_cap=None):
    """Each decode row (a query at position lens[s] - 1) over its sequence's pooled context."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(q.shape[0]):
        length = int(lens[s])
        first = 0 if window is None else max(0, length - window)  # keys before it may be poisoned
        blocks = tables[s][: -(-length // k_pool.shape[1])]
        keys = k_pool[blocks].flatten(0, 1)[first:length]
        values = v_pool[blocks].flatten(0, 1)[first:length]
        out[s] = plain_attention(q[s][None], keys, values, scale, [length - 1 - first], window, soft_cap)[0]
    return out


def poisoned_case(heads, kv_heads, dim, block_size, lens, window, *, seed=0, dtype=torch.float32):
    """Paged decode inputs whose table entries before each sequence's window name a NaN block: a backend
    that reads a block outside a window gives NaN. Padding past each context is a finite block."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    width = int((lens.max() + block_size - 1) // block_size)
    num_blocks = width * len(lens) + 2
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    poison = num_blocks - 1
    k_pool[poison] = torch.nan
    v_pool[poison] = torch.nan
    perm = torch.randperm(num_blocks - 1, generator=gen)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        blocks = -(-n // block_size)
        tables[i, :blocks] = perm[i * width : i * width + blocks]
        if window is not None:
            tables[i, : max(0, n - window) // block_size] = poison
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, tables, lens


def decode_meta(tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=len(lens),
        decode_block_tables=tables,
        decode_context_lens=lens,
        prefills=[],
        block_size=block_size,
    )


def run_decode(backend, q, k_pool, v_pool, tables, lens, **variant) -> torch.Tensor:
    meta = decode_meta(tables, lens, k_pool.shape[1])
    backend.prepare(meta)
    empty = torch.empty(0, *k_pool.shape[2:], dtype=q.dtype)
    return backend.forward(q, empty, empty, (k_pool, v_pool), meta, q.shape[-1] ** -0.5, **variant)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (6, 2, 13, 5)])
def test_decode_matches_per_sequence_attention(heads: int, kv_heads: int, dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_seqs = 64, 7
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    lens = torch.randint(1, 8 * block_size, (num_seqs,), generator=gen)
    width = int((lens.max() + block_size - 1) // block_size)
    # Distinct, shuffled blocks per sequence; the tail of short tables is padding the mask must hide.
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(num_seqs)])
    q = torch.randn(num_seqs, heads, dim, generator=gen)
    meta = decode_meta(tables, lens, block_size)
    groups = _decode_groups(meta, None)
    assert len(groups) > 1  # lengths spread widely: several groups
    out = torch.empty_like(q)
    for group in groups:
        out[group.rows] = _decode(q[group.rows], LayerKV(k_pool, v_pool), group, dim**-0.5)
    ref = _reference(q, k_pool, v_pool, tables, lens, dim**-0.5)
    assert rel_err(out, ref) < 1e-5


# Windows below, at and past block boundaries, and past every context (the window never binds).
WINDOWS = [1, 4, 7, 16, 21, 40, 1000]


@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_decode_window_and_soft_cap(block_size: int, soft_cap: float | None) -> None:
    lens = [1, 3, block_size, block_size + 1, 21, 40, 41, 97]
    for window in WINDOWS:
        q, k_pool, v_pool, tables, lens_t = poisoned_case(6, 2, 16, block_size, lens, window)
        out = run_decode(
            TorchAttentionBackend(),
            q,
            k_pool,
            v_pool,
            tables,
            lens_t,
            sliding_window=window,
            logits_soft_cap=soft_cap,
        )
        ref = _reference(q, k_pool, v_pool, tables, lens_t, 0.25, window, soft_cap)
        assert rel_err(out, ref) < 1e-5, window


def test_soft_cap_changes_scores() -> None:
    """The cap is applied: large scores are squashed (a cap test that would pass without it is no test)."""
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 4, 16, 5, [30], None)
    q = q * 20
    backend = TorchAttentionBackend()
    capped = run_decode(backend, q, k_pool, v_pool, tables, lens, logits_soft_cap=1.0)
    plain = run_decode(backend, q, k_pool, v_pool, tables, lens)
    assert rel_err(capped, _reference(q, k_pool, v_pool, tables, lens, 0.25, None, 1.0)) < 1e-5
    assert rel_err(plain, _reference(q, k_pool, v_pool, tables, lens, 0.25)) < 1e-5
    assert (capped - plain).abs().max() > 0.1


def prefill_case(block_size, chunks, window, *, heads=6, kv_heads=2, dim=16, seed=0):
    """A prefill step: chunks (cached tokens, new tokens) of separate sequences, the cached K/V already in
    the pool (the blocks wholly before a chunk's first window poisoned), the new K/V given to forward.

    Returns the step's inputs, and per chunk the full sequence's q/k/v and its first query position."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in chunks) + 2
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    poison = num_blocks - 1
    k_pool[poison], v_pool[poison] = torch.nan, torch.nan
    next_block, start = 0, 0
    prefills, slots, qs, ks, vs, sequences = [], [], [], [], [], []
    for cached, new in chunks:
        length = cached + new
        q = torch.randn(length, heads, dim, generator=gen)
        k = torch.randn(length, kv_heads, dim, generator=gen)
        v = torch.randn(length, kv_heads, dim, generator=gen)
        table = torch.arange(next_block, next_block + -(-length // block_size))
        next_block += len(table)
        flat_k, flat_v = k_pool.view(-1, kv_heads, dim), v_pool.view(-1, kv_heads, dim)
        positions = torch.arange(cached)
        flat_k[table[positions // block_size] * block_size + positions % block_size] = k[:cached]
        flat_v[table[positions // block_size] * block_size + positions % block_size] = v[:cached]
        if window is not None:
            table[: max(0, cached - window + 1) // block_size] = poison
        new_positions = torch.arange(cached, length)
        slots.append(table[new_positions // block_size] * block_size + new_positions % block_size)
        prefills.append(PrefillChunk(start, new, length, table))
        qs.append(q[cached:])
        ks.append(k[cached:])
        vs.append(v[cached:])
        sequences.append((q, k, v, cached))
        start += new
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=prefills,
        block_size=block_size,
    )
    return (torch.cat(qs), torch.cat(ks), torch.cat(vs), (k_pool, v_pool), meta), sequences


@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_prefill_window_and_soft_cap(block_size: int, soft_cap: float | None) -> None:
    # A first chunk (no cached context), chunks resuming mid-block and on a block boundary, one longer
    # than the windows, one single-token-long context before it.
    chunks = [(0, 30), (13, 9), (2 * block_size, 17), (41, 3), (1, 6)]
    for window in [None, *WINDOWS]:
        inputs, sequences = prefill_case(block_size, chunks, window)
        backend = TorchAttentionBackend()
        backend.prepare(inputs[-1])
        out = backend.forward(*inputs, 0.25, sliding_window=window, logits_soft_cap=soft_cap)
        row = 0
        for q, k, v, cached in sequences:
            new = q.shape[0] - cached
            ref = plain_attention(q[cached:], k, v, 0.25, range(cached, q.shape[0]), window, soft_cap)
            assert rel_err(out[row : row + new], ref) < 1e-5, (window, cached)
            row += new


def test_layers_with_different_windows_share_a_step() -> None:
    """A step's groups and masks are derived per window: a full layer after a sliding one is not windowed
    (a model with a full layer frees nothing, so nothing is poisoned here)."""
    inputs, sequences = prefill_case(5, [(12, 8), (0, 9)], None)
    backend = TorchAttentionBackend()
    backend.prepare(inputs[-1])
    for window in (4, None, 4):
        out = backend.forward(*inputs, 0.25, sliding_window=window)
        row = 0
        for q, k, v, cached in sequences:
            ref = plain_attention(q[cached:], k, v, 0.25, range(cached, q.shape[0]), window)
            assert rel_err(out[row : row + q.shape[0] - cached], ref) < 1e-5
            row += q.shape[0] - cached


def test_bad_variants_raise() -> None:
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 4, 16, 5, [30], None)
    with pytest.raises(ValueError, match="sliding_window"):
        run_decode(TorchAttentionBackend(), q, k_pool, v_pool, tables, lens, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        run_decode(TorchAttentionBackend(), q, k_pool, v_pool, tables, lens, logits_soft_cap=0.0)


# ---------------------------------------------------------------------------------------------------
# Quantized pools


def _triton_backend() -> TritonAttentionBackend:
    """The Triton backend on CPU tensors, in Triton's interpreter (conftest.py)."""
    return TritonAttentionBackend(torch.device("cpu"))


BACKENDS = [
    TorchAttentionBackend,
    *([CpuAttentionBackend] if cpu_kernels_available() else []),
    *([] if torch.cuda.is_available() else [_triton_backend]),  # these tests' tensors are on the CPU
]


def quantized_pool(pool: torch.Tensor, dtype: torch.dtype):
    """A float pool [blocks, block_size, kv_heads, dim] stored in `dtype`, its row scales, and what it
    stands for."""
    stored, scale = quantize(pool, dtype)
    return stored, scale, dequantize(stored, scale, torch.float32)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", list(QUANTIZED_KV_DTYPES.values()), ids=list(QUANTIZED_KV_DTYPES))
def test_decode_over_quantized_pools_reads_their_dequantized_values(backend_cls, dtype) -> None:
    q, k_pool, v_pool, tables, lens = poisoned_case(6, 2, 16, 5, [1, 4, 5, 6, 21, 40, 97], None)
    k_stored, k_scale, k_real = quantized_pool(k_pool, dtype)
    v_stored, v_scale, v_real = quantized_pool(v_pool, dtype)
    meta = decode_meta(tables, lens, 5)
    backend = backend_cls()
    backend.prepare(meta)
    empty = torch.empty(0, 2, 16)
    kv = LayerKV(k_stored, v_stored, k_scale, v_scale)
    out = backend.forward(q, empty, empty, kv, meta, 0.25)
    ref = _reference(q, k_real, v_real, tables, lens, 0.25)
    assert rel_err(out, ref) < 1e-5
    # The values stored are coarse: the dequantized pool is not the float one (a test that could fail).
    assert rel_err(_reference(q, k_pool, v_pool, tables, lens, 0.25), ref) > 1e-4


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", list(QUANTIZED_KV_DTYPES.values()), ids=list(QUANTIZED_KV_DTYPES))
def test_prefill_over_a_quantized_pool_sees_every_key_quantized(backend_cls, dtype) -> None:
    """New K/V are stored quantized at their slots; every chunk, its sequence's first included, attends
    to the quantized-dequantized keys (so one chunk or several give the same answer)."""
    block_size = 5
    (q, k, v, (k_pool, v_pool), meta), sequences = prefill_case(block_size, [(0, 12), (13, 9), (10, 1)], None)
    k_stored, k_scale, _ = quantized_pool(k_pool, dtype)
    v_stored, v_scale, _ = quantized_pool(v_pool, dtype)
    backend = backend_cls()
    backend.prepare(meta)
    out = backend.forward(q, k, v, LayerKV(k_stored, v_stored, k_scale, v_scale), meta, 0.25)
    slots = meta.slot_mapping
    k_codes, k_rows = quantize(k, dtype)
    assert torch.equal(k_stored.view(torch.uint8).flatten(0, 1)[slots], k_codes.view(torch.uint8))
    assert torch.equal(k_scale.flatten(0, 1)[slots], k_rows)  # each new row's scale at its slot
    assert torch.equal(v_scale.flatten(0, 1)[slots], quantize(v, dtype)[1])
    row = 0
    for seq_q, seq_k, seq_v, cached in sequences:
        new = seq_q.shape[0] - cached
        real_k = dequantize(*quantize(seq_k, dtype), torch.float32)
        real_v = dequantize(*quantize(seq_v, dtype), torch.float32)
        ref = plain_attention(seq_q[cached:], real_k, real_v, 0.25, range(cached, seq_q.shape[0]))
        assert rel_err(out[row : row + new], ref) < 1e-5, cached
        row += new


def test_quantized_pools_need_their_scales() -> None:
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 2, 16, 5, [30], None)
    stored = k_pool.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scales"):
        run_decode(TorchAttentionBackend(), q, stored, stored, tables, lens)
