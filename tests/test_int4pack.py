"""torch's CPU int4 layout: the C++ dequantization against the torch ops path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from duoserve import int4pack
from duoserve.int4pack import GROUP_SIZE, dequantize_rows, dequantize_rows_torch, unpack

needs_op = pytest.mark.skipif(
    not int4pack.fast_dequantize_available(), reason="the C++ kernels did not build"
)


def pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] codes 0-15 in torch's layout with blocks of `block` rows (either block size, whatever
    this host's torch packs)."""
    n, k = codes.shape
    half = block // 2
    blocks = codes.to(torch.uint8).view(n // block, block, k)
    packed = blocks[:, :half] | (blocks[:, half:] << 4)  # [blocks, half, K]
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


def random_matrix(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and (scale, zero) pairs over uneven magnitudes and both signs, as Q4_K/Q4_1 files give."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
    magnitude = torch.exp(torch.randn(k // GROUP_SIZE, n, 2, generator=generator) * 3)
    pairs = (torch.randn(k // GROUP_SIZE, n, 2, generator=generator) * magnitude).bfloat16()
    return codes, pairs


def test_this_hosts_packing_is_the_one_unpacked():
    assert int4pack.BLOCK in (32, 64)
    codes, _ = random_matrix(128, 96)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(packed.view(128, 48), pack(codes, int4pack.BLOCK))
    assert torch.equal(unpack(pack(codes, 32), 32, 96, 96, 32).int(), codes[32:96])


@needs_op
@pytest.mark.parametrize("block", [64, 32, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vectorized", [True, False])
def test_op_matches_the_torch_ops_bit_for_bit(block, dtype, vectorized):
    """Both block sizes the layout has (and 4: too few rows for the vector paths' gathers of 4 rows),
    whole and partial ranges."""
    n, k = 4 * 64, 160
    codes, pairs = random_matrix(n, k, seed=block)
    packed = pack(codes, block)
    for start, end in ((0, n), (block, 3 * block), (n - block, n)):
        expected = torch.empty(end - start, k, dtype=dtype)
        dequantize_rows_torch(packed, pairs, start, end, expected, block)
        out = torch.full((end - start, k), float("nan"), dtype=dtype)
        torch.ops.duoserve_cpu.int4pack_dequantize(packed, pairs, start, end, block, out, vectorized)
        assert torch.equal(out, expected), (start, end)
    # and the values themselves: (q - 8) * scale + zero, up to float32 rounding of its terms
    whole = torch.empty(n, k)
    dequantize_rows(packed, pairs, 0, n, whole, block)
    scale, zero = (pairs.float().repeat_interleave(GROUP_SIZE, dim=0)[..., i].T for i in (0, 1))
    terms = (codes - 8).abs() * scale.abs() + zero.abs() + 8 * scale.abs()
    assert ((whole - ((codes - 8) * scale + zero)).abs() <= 2**-22 * terms).all()


@needs_op
def test_rounding_ties_and_nan_as_torch():
    """Values halfway between two bfloat16s round to even, a NaN scale gives torch's NaN."""
    n, k, block = 64, 32, 64
    codes = torch.full((n, k), 9, dtype=torch.int32)  # q - 8 = 1: the value is scale + zero
    pairs = torch.zeros(1, n, 2, dtype=torch.bfloat16)
    pairs[0, :, 0] = 1.0
    pairs[0, :, 1] = torch.tensor(2.0**-8).bfloat16()  # 1 + 2^-8: a tie between 1 and 1 + 2^-7
    pairs[0, 1, 0] = float("nan")
    out = torch.empty(n, k, dtype=torch.bfloat16)
    dequantize_rows(pack(codes, block), pairs, 0, n, out, block)
    assert torch.equal(out[0], torch.ones(k, dtype=torch.bfloat16))
    assert out[1].isnan().all() and out[1].view(torch.int16).eq(0x7FC0).all()


def test_torch_ops_path_where_the_op_is_missing(monkeypatch):
    """Without the C++ kernels the torch ops give the same tiles."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    pairs = torch.randn(2, 128, 2, generator=torch.Generator().manual_seed(4)).bfloat16()
    monkeypatch.setattr(int4pack, "fast_dequantize_available", lambda: False)
    out = torch.empty(128, 64, dtype=torch.bfloat16)
    dequantize_rows(pack(codes, 64), pairs, 0, 128, out, 64)
    scale, zero = (pairs.float().repeat_interleave(GROUP_SIZE, dim=0)[..., i].T for i in (0, 1))
    assert torch.allclose(out.float(), (codes - 8) * scale + zero, rtol=2**-8, atol=1e-4)


@needs_op
def test_rejects_rows_that_are_not_whole_blocks():
    codes, pairs = random_matrix(128, 64)
    out = torch.empty(32, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="whole blocks"):
        torch.ops.duoserve_cpu.int4pack_dequantize(pack(codes, 64), pairs, 32, 64, 64, out)
