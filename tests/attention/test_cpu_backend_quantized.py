"""The paged C++ decode kernel over 1-byte KV pools (int8, FP8 E4M3 and E5M2), read in place with their
per-row float16 scales, against the same kernel's float32 path over the pools dequantized by torch: on every
code path (the AVX2 grouped kernel and the AVX-512 one for head sizes 64/128 and groups up to 8, the AVX2
kernel of any group, the generic loops), with sliding windows and soft caps, and the scales' checks."""

from __future__ import annotations

import shutil

import pytest
import torch

from duoserve.attention.cpu_backend import paged_decode
from duoserve.cpu_kernels import cpu_kernels_available
from tests.attention.quantized_kv_cases import (
    ONE_BYTE,
    all_values,
    dequantize,
    poison,
    quantize,
    spread_pool,
)
from tests.attention.test_torch_backend import WINDOWS, poisoned_case, rel_err

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the CPU kernel cannot be built", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    assert cpu_kernels_available()


def _case(heads, kv_heads, dim, block_size, lens, dtype, seed=0):
    """A decode batch over a random pool quantized to `dtype`: shuffled distinct blocks per sequence."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    width = int((lens.max() + block_size - 1) // block_size)
    num_blocks = width * len(lens) + 3
    shape = (num_blocks, block_size, kv_heads, dim)
    k_pool, k_scale = quantize(spread_pool(shape, gen), dtype)
    v_pool, v_scale = quantize(spread_pool(shape, gen), dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(((lens + block_size - 1) // block_size).tolist()):
        tables[i, :n] = perm[i * width : i * width + n]
    q = torch.randn(len(lens), heads, dim, generator=gen) / 4
    return q, k_pool, v_pool, tables, lens, k_scale, v_scale


def _both(q, k_pool, v_pool, tables, lens, k_scale, v_scale, scale, *variant):
    """The kernel in place over the 1-byte pools, and over the pools dequantized to float32."""
    out = paged_decode(q, k_pool, v_pool, tables, lens, scale, *variant, k_scale=k_scale, v_scale=v_scale)
    ref = paged_decode(
        q, dequantize(k_pool, k_scale), dequantize(v_pool, v_scale), tables, lens, scale, *variant
    )
    return out, ref


SHAPES = [
    (9, 3, 64, 16),  # SmolLM2: group 3, the grouped kernel (AVX2) / the AVX-512 kernel
    (8, 1, 128, 16),  # head size 128, group 8
    (4, 4, 64, 5),  # MHA, a block size that splits 8- and 16-token chunks
    (2, 2, 64, 40),  # blocks of several chunks plus a remainder
    (12, 2, 128, 7),  # group 6
    (16, 1, 64, 16),  # group 16: attend_avx2 (AVX2) / the generic loops (AVX-512)
    (6, 2, 13, 5),  # odd head size: the generic loops
]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"), SHAPES)
@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_matches_the_float32_path_over_the_dequantized_pool(heads, kv_heads, dim, block_size, dtype):
    lens = [301, 1, 7 * block_size - 2, block_size, block_size + 1, 3 * block_size, 50, 97]
    q, k_pool, v_pool, tables, lens, k_scale, v_scale = _case(heads, kv_heads, dim, block_size, lens, dtype)
    # All 8 sequences: a work item per sequence with all its KV heads; 3 (under 4 per thread): per
    # (sequence, KV head).
    for num in (8, 3):
        args = (q[:num], k_pool, v_pool, tables[:num], lens[:num], k_scale, v_scale, dim**-0.5)
        out, ref = _both(*args)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref.double()) < 1e-5, num


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(9, 3, 64, 16), (8, 1, 128, 16), (12, 2, 128, 7), (4, 4, 64, 5), (16, 1, 64, 16)],
)
@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (37, 2.5)])
def test_bfloat16_queries(heads, kv_heads, dim, block_size, dtype, window, soft_cap):
    """A bfloat16 model over a 1-byte cache: bfloat16 output (rounded: a looser tolerance). With AVX512-BF16,
    the AVX-512 kernel dots FP8 rows with the queries in bf16 (vdpbf16ps): every head size and group,
    odd chunks (blocks of 5 and 7), a window and a soft cap."""
    q, k_pool, v_pool, tables, lens, k_scale, v_scale = _case(
        heads, kv_heads, dim, block_size, [1, 17, 64, 97, 200], dtype
    )
    for num in (5, 2):  # a work item per sequence; per (sequence, KV head)
        args = (q[:num].bfloat16(), k_pool, v_pool, tables[:num], lens[:num], k_scale, v_scale, dim**-0.5)
        out, ref = _both(*args, window, soft_cap)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, ref.double()) < 1e-2, num


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (8, 1, 128, 5), (6, 2, 13, 5)]
)
@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_window_and_soft_cap(heads, kv_heads, dim, block_size, dtype, soft_cap):
    """Table entries before each window name a block of the largest values: reading one changes the output."""
    lens = [1, 3, block_size, block_size + 1, 21, 40, 41, 97]
    for window in [None, *WINDOWS]:
        q, k_pool, v_pool, tables, lens_t = poisoned_case(heads, kv_heads, dim, block_size, lens, window)
        k_pool, k_scale = quantize(k_pool, dtype)
        v_pool, v_scale = quantize(v_pool, dtype)
        poison(k_pool, v_pool, k_pool.shape[0] - 1)
        # All sequences: a work item per sequence; the first three: per (sequence, KV head).
        for num in (len(lens), 3):
            args = (q[:num], k_pool, v_pool, tables[:num], lens_t[:num], k_scale, v_scale, dim**-0.5)
            out, ref = _both(*args, window, soft_cap)
            assert rel_err(out, ref.double()) < 1e-5, (window, num)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (16, 1, 64), (8, 1, 128), (6, 2, 13)])
@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_every_value_decodes_exactly(heads, kv_heads, dim, dtype):
    """A context of one token: the output is that token's V row times its scale, exactly, for every
    finite value of the dtype (FP8's subnormals, zeros of both signs, the largest) on every head, under
    row scales that differ per token and head."""
    codes = all_values(dtype).view(torch.uint8)
    per_block = kv_heads * dim
    num_blocks = -(-len(codes) // per_block)
    v_pool = torch.zeros(num_blocks * per_block, dtype=torch.uint8)
    v_pool[: len(codes)] = codes
    v_pool = v_pool.view(dtype).view(num_blocks, 1, kv_heads, dim)
    k_pool = torch.zeros_like(v_pool)
    k_scale = torch.ones(num_blocks, 1, kv_heads, dtype=torch.float16)
    # Not powers of two (rounded products), a different one per token and head.
    v_scale = (
        torch.tensor([0.75 * 2.0**h for h in range(kv_heads)]) * (1 + torch.arange(num_blocks) % 5)[:, None]
    )
    v_scale = v_scale[:, None, :].half()
    tables = torch.arange(num_blocks)[:, None]
    lens = torch.ones(num_blocks, dtype=torch.long)
    q = torch.randn(num_blocks, heads, dim)
    out = paged_decode(q, k_pool, v_pool, tables, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    expected = dequantize(v_pool, v_scale)[:, 0].repeat_interleave(heads // kv_heads, dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_large_scores_do_not_overflow(dtype):
    q, *rest = _case(9, 3, 64, 16, [200, 37], dtype)
    out, ref = _both(q * 30, *rest, 0.125)
    assert torch.isfinite(out).all() and rel_err(out, ref.double()) < 1e-5


def test_bad_scales_raise():
    q, k_pool, v_pool, tables, lens, k_scale, v_scale = _case(9, 3, 64, 16, [20], torch.int8)

    def call(k_pool=k_pool, v_pool=v_pool, **scales):
        return paged_decode(q, k_pool, v_pool, tables, lens, 0.125, **scales)

    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        call()
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        call(k_scale=k_scale)
    rows = rf"float16 \[num_blocks, block_size, num_kv_heads\] = \[{k_pool.shape[0]}, 16, 3\]"
    with pytest.raises(ValueError, match="float16"):
        call(k_scale=k_scale.float(), v_scale=v_scale)
    with pytest.raises(ValueError, match=rows):
        call(k_scale=k_scale, v_scale=torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match=rows):
        call(k_scale=k_scale[None], v_scale=v_scale)
    with pytest.raises(ValueError, match="contiguous"):
        call(k_scale=torch.ones(*k_scale.shape[:2], 6, dtype=torch.float16)[..., ::2], v_scale=v_scale)
    with pytest.raises(ValueError, match="not torch.float32"):  # scales with a float pool
        call(k_pool=k_pool.float(), v_pool=v_pool.float(), k_scale=k_scale, v_scale=v_scale)
    # The op checks the same on its own (a caller that skips the wrapper).
    op = torch.ops.duoserve_cpu.paged_decode
    with pytest.raises(RuntimeError, match="needs k_scale and v_scale"):
        op(q, k_pool, v_pool, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="float16"):
        op(q, k_pool, v_pool, tables, lens, 0.125, 0, 0.0, k_scale, torch.ones(2))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(q, k_pool, v_pool.view(torch.float8_e4m3fn), tables, lens, 0.125, 0, 0.0, k_scale, v_scale)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (8, 1, 128, 5), (16, 1, 64, 16)]
)
@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_contexts_match_one_thread(heads, kv_heads, dim, block_size, dtype, q_dtype):
    """One sequence of 900 tokens on 2 threads: its KV heads' contexts are cut into ranges merged by their
    log-sum-exp (the kernels' scores carry the 1-byte load scale: the merge must see true logits); against
    the float32 path over the dequantized pools on one thread, which attends each context whole."""
    q, k_pool, v_pool, tables, lens, k_scale, v_scale = _case(heads, kv_heads, dim, block_size, [900], dtype)
    q = q.to(q_dtype)
    ref = paged_decode(q, dequantize(k_pool, k_scale), dequantize(v_pool, v_scale), tables, lens, dim**-0.5)
    torch.set_num_threads(2)  # the module's single_torch_thread fixture restores it
    out = paged_decode(q, k_pool, v_pool, tables, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert rel_err(out, ref.double()) < (1e-5 if q_dtype == torch.float32 else 1e-2)
