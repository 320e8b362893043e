"""The torch backend's batched, padded decode against plain attention over each sequence's context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.torch_backend import TorchAttentionBackend, _decode


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
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=num_seqs,
        decode_block_tables=tables,
        decode_context_lens=lens,
        prefills=[],
        block_size=block_size,
    )
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    assert len(backend._decode_groups) > 1  # lengths spread widely: several groups
    out = torch.empty_like(q)
    for group in backend._decode_groups:
        out[group.rows] = _decode(q[group.rows], k_pool, v_pool, group, dim**-0.5)
    ref = _reference(q, k_pool, v_pool, tables, lens, dim**-0.5)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
