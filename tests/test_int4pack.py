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


needs_fused = pytest.mark.skipif(
    not int4pack.fused_matmul_available(), reason="the fused kernel is not built for this CPU"
)
# The fused kernel's paths, by the rows from which it runs on AMX tiles: the host's threshold, AMX at
# every row count, never (the AVX-512 path). The same path thrice where the host has no AMX.
KERNEL_PATHS = pytest.mark.parametrize("amx_min_rows", [None, 1, 1 << 40], ids=["host", "amx", "avx512"])


def float32_weights(codes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero in float64 then float32: the reference the kernels approximate."""
    scale, zero = (pairs.double().repeat_interleave(GROUP_SIZE, dim=0)[..., i].T for i in (0, 1))
    return ((codes - 8) * scale + zero).float()


def fused_bound(x: torch.Tensor, codes: torch.Tensor, pairs: torch.Tensor, reference: torch.Tensor):
    """What the fused kernel may be off by: its bfloat16 output (2^-9 of the value, with room for one
    more step), plus float32 sums whose terms are x times 128 + q codes and the group's offsets."""
    scale, zero = (pairs.float().abs().repeat_interleave(GROUP_SIZE, dim=0)[..., i].T for i in (0, 1))
    terms = x.float().abs() @ (144 * scale + zero).T
    return 2**-8 * reference.abs() + 2**-15 * terms


@needs_fused
@KERNEL_PATHS
@pytest.mark.parametrize(("n", "k"), [(64, 32), (192, 96), (128, 544), (320, 1536)])
def test_fused_matches_float32_math_on_torchs_layout(n, k, amx_min_rows):
    """torch's own packing (whatever the host's), every row count 1..64 and a few more than one pass of
    64, against float32 math on the exact weights."""
    codes, pairs = random_matrix(n, k, seed=n + k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    weights = float32_weights(codes, pairs)
    generator = torch.Generator().manual_seed(k)
    for rows in [*range(1, 65), 65, 131]:
        x = (torch.randn(rows, k, generator=generator) * torch.rand(k, generator=generator) * 4).bfloat16()
        out = int4pack.fused_matmul(x, packed, pairs, amx_min_rows)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        reference = x.float() @ weights.T
        error = (out.float() - reference).abs()
        assert (error <= fused_bound(x, codes, pairs, reference)).all(), (rows, error.max())


@needs_fused
def test_fused_agrees_with_the_tiles_within_bfloat16_rounding():
    """The tiles path rounds each weight to bfloat16 before the GEMM; the fused kernel rounds none: both
    stay within the weights' bfloat16 rounding of the float32 product."""
    n, k = 256, 576
    codes, pairs = random_matrix(n, k, seed=5)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    tile = torch.empty(n, k, dtype=torch.bfloat16)
    dequantize_rows(packed, pairs, 0, n, tile, int4pack.BLOCK)
    x = torch.randn(32, k, generator=torch.Generator().manual_seed(6)).bfloat16()
    fused = int4pack.fused_matmul(x, packed, pairs).float()
    tiles = torch.nn.functional.linear(x, tile).float()
    terms = x.float().abs() @ float32_weights(codes, pairs).abs().T
    assert ((fused - tiles).abs() <= 2**-8 * (terms + fused.abs())).all()
    assert not torch.equal(fused, tiles)  # not the tiles' rounding: a different computation


@needs_fused
@KERNEL_PATHS
def test_fused_exact_on_representable_sums(amx_min_rows):
    """Codes and scales whose products and sums are exact in float32: the kernel's result is the exact
    value rounded once (catches a wrong column pairing or a nibble swap that random data might hide in
    its tolerance)."""
    n, k = 128, 64
    generator = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
    pairs = torch.zeros(k // GROUP_SIZE, n, 2, dtype=torch.bfloat16)
    pairs[..., 0] = 2.0 ** torch.randint(-3, 3, (k // GROUP_SIZE, n), generator=generator).float()
    pairs[..., 1] = torch.randint(-8, 8, (k // GROUP_SIZE, n), generator=generator).float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for rows in (1, 5, 16, 21):  # one partial tile, a whole one, a whole one and a padded one
        x = torch.randint(-4, 5, (rows, k), generator=generator).bfloat16()
        expected = (x.double() @ float32_weights(codes, pairs).double().T).bfloat16()
        assert torch.equal(int4pack.fused_matmul(x, packed, pairs, amx_min_rows), expected), rows


@needs_fused
def test_fused_rejects_what_it_cannot_read():
    codes, pairs = random_matrix(96, 64)  # 96 rows: not whole blocks of 64
    with pytest.raises(RuntimeError, match="whole blocks"):
        int4pack.fused_matmul(torch.zeros(2, 64, dtype=torch.bfloat16), pack(codes, 32), pairs)
    codes, pairs = random_matrix(64, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        int4pack.fused_matmul(torch.zeros(2, 64), pack(codes, 64), pairs)
