"""The quantized linears and embedding against float32 math on gguf's dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve import int4pack
from duoserve.cpu_kernels import int8_mm_available
from duoserve.models import linear as linear_module
from duoserve.models.gguf_quants import INT4_TYPES, QUANTIZED_TYPES, GGUFTensor, random_blocks
from duoserve.models.linear import (
    QUANTIZED_MAX_ROWS,
    DenseEmbedding,
    DenseLinear,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    StackedLinear,
    make_embedding,
    make_linear,
)
from tests.helpers import rel_err

CPU = torch.device("cpu")


def _tensor(type_name: str, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
    return GGUFTensor(
        random_blocks(type_name, rows, cols, torch.Generator().manual_seed(seed)), type_name, cols
    )


def _expected(x: torch.Tensor, weights: list[GGUFTensor], bias: torch.Tensor | None) -> torch.Tensor:
    dense = torch.cat([w.dequantize() for w in weights])
    return x.float() @ dense.T + (0 if bias is None else bias.float())


def test_torch_int4_layout_is_recognised():
    """The tiled path unpacks torch's int4 layout; on x86 (AVX2 or AVX-512) it must be a known one."""
    assert linear_module._INT4_BLOCK in (32, 64)


@pytest.mark.parametrize("type_name", QUANTIZED_TYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantized_linear_matches_float32_matmul(type_name, with_bias, monkeypatch):
    # Small tiles and build chunks so that several of each are exercised on a small matrix.
    monkeypatch.setattr(linear_module, "TILE_VALUES", 64 * 512)
    monkeypatch.setattr(linear_module, "_BUILD_ROWS", 64)
    weight = _tensor(type_name, 192, 512)
    bias = torch.randn(192).bfloat16() if with_bias else None
    linear = make_linear([weight], bias, torch.bfloat16, CPU, quantized=True)
    assert type(linear) is (Int4Linear if type_name in INT4_TYPES else Int8Linear)
    # The codes as the kernels see them: exact codes, scales rounded to bfloat16 (or re-quantized per row).
    assert rel_err(linear.dequantize(), weight.dequantize()) < 1e-2
    for rows in (1, 3, QUANTIZED_MAX_ROWS, QUANTIZED_MAX_ROWS + 1, 40):
        x = torch.randn(rows, 512).bfloat16()
        out = linear(x)
        assert out.shape == (rows, 192) and out.dtype == torch.bfloat16
        # bfloat16 activations and scales, and int8's per-row re-quantization: about 1% either way.
        assert rel_err(out, _expected(x, [weight], bias)) < 2e-2, rows
        if rows > QUANTIZED_MAX_ROWS:  # the tiled GEMM multiplies exactly the matrix the kernels hold
            reference = F.linear(x.float(), linear.dequantize().float()) + (
                0 if bias is None else bias.float()
            )
            assert rel_err(out, reference) < 1e-2, rows


@pytest.mark.parametrize("type_name", INT4_TYPES)
def test_int4_tiles_are_the_torch_ops_values_bit_for_bit(type_name):
    """The tiles come from a C++ op where it builds: exactly the values of the torch ops path, whose
    float32 arithmetic and single rounding keep the weight error down (int4pack.dequantize_rows)."""
    linear = make_linear([_tensor(type_name, 192, 512)], None, torch.bfloat16, CPU, quantized=True)
    expected = torch.empty(192, 512, dtype=torch.bfloat16)
    int4pack.dequantize_rows_torch(linear.packed, linear.scales_and_zeros, 0, 192, expected, int4pack.BLOCK)
    assert torch.equal(linear.dequantize(), expected)


def test_no_dense_copy_is_kept():
    weight = _tensor("Q4_K", 256, 1024)
    # Tiles for a large step (the fused kernel, where it runs, keeps no scratch at all).
    linear = make_linear([weight], None, torch.bfloat16, CPU, quantized=True, fused_rows=(0, 0))
    held = sum(t.numel() * t.element_size() for t in (linear.packed, linear.scales_and_zeros))
    assert held <= 1.12 * weight.nbytes  # 5 bits per weight against the file's 4.5
    linear(torch.randn(64, 1024).bfloat16())  # a large step: tiles, not a matrix-sized buffer
    scratch = linear_module._scratch._buffers[(torch.bfloat16, CPU, "tile")]
    assert scratch.numel() <= max(linear_module.TILE_VALUES, 64 * 1024)
    q6 = make_linear([_tensor("Q6_K", 256, 1024)], None, torch.bfloat16, CPU, quantized=True)
    assert q6.codes.element_size() == 1 and q6.codes.shape == (256, 1024)


def test_fused_parts_of_different_types():
    """Q4_K_M files store Q/K in Q4_K and V in Q6_K: the fused QKV keeps each part in its own format."""
    parts = [_tensor("Q4_K", 128, 256, 1), _tensor("Q4_0", 64, 256, 2), _tensor("Q6_K", 64, 256, 3)]
    bias = torch.randn(256).bfloat16()
    linear = make_linear(parts, bias, torch.bfloat16, CPU, quantized=True)
    assert type(linear) is StackedLinear
    assert [type(p) for p in linear.parts] == [Int4Linear, Int8Linear]
    for rows in (2, 33):
        x = torch.randn(rows, 256).bfloat16()
        assert rel_err(linear(x), _expected(x, parts, bias)) < 2e-2


def test_dense_when_not_quantized():
    parts = [_tensor("Q5_K", 32, 256, 1), torch.randn(16, 256)]
    linear = make_linear(parts, None, torch.float32, CPU, quantized=False)
    assert type(linear) is DenseLinear
    assert torch.equal(linear.weight, torch.cat([parts[0].dequantize(), parts[1]]))
    x = torch.randn(3, 256)
    assert torch.equal(linear(x), F.linear(x, linear.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_embedding_gathers_exact_rows(dtype):
    weight = _tensor("Q4_K", 40, 256)
    embedding = make_embedding(weight, dtype, CPU, quantized=True)
    assert type(embedding) is QuantizedEmbedding
    ids = torch.tensor([3, 39, 3, 0, 17])
    out = embedding(ids)
    assert out.dtype == dtype and torch.equal(out, weight.dequantize().to(dtype)[ids])
    dense = make_embedding(weight, dtype, CPU, quantized=False)
    assert type(dense) is DenseEmbedding and torch.equal(dense(ids), out)


@pytest.mark.parametrize("max_rows", [0, 2, 16])
def test_row_threshold_is_the_linears_own(max_rows):
    """Each host passes its own threshold (duoserve/hardware.py): codes up to it, dequantized tiles above."""
    weight = _tensor("Q4_1", 96, 128)
    linear = make_linear([weight], None, torch.bfloat16, CPU, True, max_rows, fused_rows=(0, 0))
    for rows in (1, 2, 3, 16, 17):
        x = torch.randn(rows, 128).bfloat16()
        expected = linear._many_rows(x) if rows > max_rows else linear._few_rows(x)
        assert torch.equal(linear(x), expected), rows


def test_tiles_first_made_under_inference_mode_serve_calls_outside_it():
    """The scratch buffer is shared by every linear: one the engine's forward (inference mode) made
    first must still serve a call made outside inference mode."""
    linear = make_linear([_tensor("Q4_K", 96, 256)], None, torch.float32, CPU, True, 0)
    x = torch.randn(3, 256)
    linear_module._scratch._buffers.clear()
    with torch.inference_mode():
        inside = linear(x)
    assert torch.equal(linear(x), inside)


@pytest.mark.parametrize("max_rows", [0, 8])
def test_fused_range_comes_before_the_threshold(max_rows):
    """Steps inside the linear's fused range run the fused kernel (where it builds), the others as
    before: torch's kernel up to the threshold, tiles above."""
    weight = _tensor("Q4_1", 192, 256)
    linear = make_linear([weight], None, torch.bfloat16, CPU, True, max_rows, fused_rows=(4, 16))
    if not int4pack.fused_matmul_available():
        assert not linear.fused and linear.fused_rows == (0, 0)
        return
    assert linear.fused and linear.fused_rows == (4, 16)
    for rows in (1, 3, 4, 9, 16, 17):
        x = torch.randn(rows, 256).bfloat16()
        if 4 <= rows <= 16:
            expected = int4pack.fused_matmul(x, linear.packed, linear.scales_and_zeros)
        else:
            expected = linear._many_rows(x) if rows > max_rows else linear._few_rows(x)
        assert torch.equal(linear(x), expected), rows


def test_fused_rows_default_to_the_hosts():
    """Without a range given, a bfloat16 model's 4-bit linears take the host's (hardware.py), and
    float32 models' never run the bfloat16 kernel."""
    linear = make_linear([_tensor("Q4_K", 64, 256)], None, torch.bfloat16, CPU, True)
    assert linear.fused_rows == (linear_module.host_fused_rows("int4") if linear.fused else (0, 0))
    q8 = make_linear([_tensor("Q8_0", 64, 256)], None, torch.bfloat16, CPU, True)
    assert q8.fused_rows == (linear_module.host_fused_rows("int8") if q8.fused else (0, 0))


needs_int8_mm = pytest.mark.skipif(not int8_mm_available(), reason="no int8 kernel built for this CPU")


@needs_int8_mm
@pytest.mark.parametrize("amx_min_rows", [None, 1, 1 << 40], ids=["host", "amx", "avx512"])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (208, 576), (64, 1536)])
def test_fused_int8_kernel_matches_float32_math(n, k, amx_min_rows):
    """x times int8 codes and row scales, every row count 1..64 and a few more: float32 sums of exact
    products, scaled, rounded once; on each of the kernel's paths (AMX tiles from the host's threshold,
    at every row count, never: the same path thrice where the host has no AMX)."""
    generator = torch.Generator().manual_seed(n + k)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = (torch.rand(n, generator=generator) * 0.02 + 1e-3).bfloat16()
    weights = codes.double() * scales.double()[:, None]
    for rows in [*range(1, 65), 67, 130]:
        x = torch.randn(rows, k, generator=generator).bfloat16()
        out = torch.ops.duoserve_cpu.int8_mm(x, codes, scales, amx_min_rows)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        reference = x.double() @ weights.T
        terms = x.double().abs() @ weights.abs().T
        assert ((out.double() - reference).abs() <= 2**-8 * reference.abs() + 2**-16 * terms).all(), rows


@needs_int8_mm
def test_int8_linear_runs_its_fused_range():
    """Int8Linear's fused range (a bfloat16 model's, where the kernel builds) comes before its threshold,
    and its values stay within bfloat16 rounding of the tiles'."""
    weight = _tensor("Q8_0", 64, 256)
    linear = make_linear([weight], None, torch.bfloat16, CPU, True, 2, fused_rows=(3, 40))
    assert type(linear) is Int8Linear and linear.fused and linear.fused_rows == (3, 40)
    for rows in (1, 2, 3, 40, 41):
        x = torch.randn(rows, 256).bfloat16()
        if 3 <= rows <= 40:
            expected = torch.ops.duoserve_cpu.int8_mm(x, linear.codes, linear.scales)
            assert rel_err(linear(x), linear._many_rows(x)) < 1e-2
        else:
            expected = linear._many_rows(x) if rows > 2 else linear._few_rows(x)
        assert torch.equal(linear(x), expected), rows
    assert not make_linear([weight], None, torch.float32, CPU, True).fused  # float32 models: never
