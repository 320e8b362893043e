"""The CPU paged decode kernel against plain attention over each sequence's gathered context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.attention import cpu_kernels
from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.torch_backend import TorchAttentionBackend


def _reference(q, k_pool, v_pool, tables, lens, scale):
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        length = int(lens[s])
        keys = k_pool[tables[s]].flatten(0, 1)[:length].transpose(0, 1)
        values = v_pool[tables[s]].flatten(0, 1)[:length].transpose(0, 1)
        out[s] = F.scaled_dot_product_attention(
            q[s][None, :, None, :], keys[None], values[None], scale=scale, enable_gqa=True
        )[0, :, 0]
    return out


def _case(num_seqs: int, heads: int, kv_heads: int, dim: int, block_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    lens = torch.randint(1, 8 * block_size, (num_seqs,), generator=gen)
    width = int((lens.max() + block_size - 1) // block_size)
    # Distinct, shuffled blocks per sequence, padded with block 0 like the model runner does.
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(num_seqs)])
    q = torch.randn(num_seqs, heads, dim, generator=gen)
    return q, k_pool, v_pool, tables, lens


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (4, 4, 8, 4), (6, 2, 13, 5)]
)
def test_kernel_matches_reference(heads: int, kv_heads: int, dim: int, block_size: int) -> None:
    if cpu_kernels.load() is None:
        pytest.skip("no C++ compiler for the CPU kernel")
    q, k_pool, v_pool, tables, lens = _case(7, heads, kv_heads, dim, block_size)
    out = cpu_kernels.paged_decode(q, k_pool, v_pool, tables, lens, dim**-0.5)
    ref = _reference(q, k_pool, v_pool, tables, lens, dim**-0.5)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_gather_path_matches_reference() -> None:
    """The fallback (padded gather + SDPA) the backend uses where the kernel is unavailable."""
    q, k_pool, v_pool, tables, lens = _case(5, 6, 2, 16, 4, seed=1)
    backend = TorchAttentionBackend(torch.device("meta"))  # not a CPU: never the kernel
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=len(lens),
        decode_block_tables=tables,
        decode_context_lens=lens,
        prefills=[],
        block_size=4,
    )
    backend.prepare(meta)
    out = backend._decode(q, k_pool, v_pool, 16**-0.5)
    ref = _reference(q, k_pool, v_pool, tables, lens, 16**-0.5)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
