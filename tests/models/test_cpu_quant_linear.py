"""float32 models' quantized linears (duoserve's C++ kernels) against float32 math on gguf's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.hardware import detect_cpu
from duoserve.models import linear as linear_module
from duoserve.models.cpu_quant_linear import GROUP, CpuQ4Linear, CpuQ8Linear
from duoserve.models.gguf_quants import INT4_TYPES, QUANTIZED_TYPES
from duoserve.models.linear import StackedLinear, make_linear
from tests.helpers import rel_err
from tests.models.test_linear import _expected, _tensor

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ kernels did not build")

# Held exactly: codes and the file's own fp16 scales (and mins).
EXACT = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "IQ4_NL")


@pytest.mark.parametrize("type_name", QUANTIZED_TYPES)
def test_codes_hold_the_files_values(type_name):
    weight = _tensor(type_name, 96, 256)
    linear = make_linear([weight], None, torch.float32, CPU, quantized=True)
    assert type(linear) is (CpuQ4Linear if type_name in INT4_TYPES else CpuQ8Linear)
    held, exact = linear.dequantize(), weight.dequantize()
    if type_name in EXACT:
        assert torch.equal(held, exact)
    else:  # Q4_K's scales rounded to fp16 (2^-11); the others re-quantized to int8 per 32 (0.4%)
        assert rel_err(held, exact) < (1e-3 if type_name == "Q4_K" else 1e-2)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_matches_float32_on_the_held_weights(type_name, with_bias, monkeypatch):
    """Every row count: 1 (the int16 GEMV), 2-7 (the int16 GEMM's tiles of 4, 3, 2 and 1 rows), the
    threshold, and past it (dequantized tiles + the float32 GEMM); 75 output rows leave a partial block
    of 4 and a partial panel of 16 to the kernels."""
    monkeypatch.setattr(linear_module, "TILE_VALUES", 32 * 256)
    weight = _tensor(type_name, 75, 256, seed=1)
    bias = torch.randn(75) if with_bias else None
    linear = make_linear([weight], bias, torch.float32, CPU, quantized=True, max_rows=8)
    reference_weight = linear.dequantize()
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 40):
        x = torch.randn(rows, 256) * torch.linspace(0.1, 3, 256)  # uneven magnitudes, as activations
        out = linear(x)
        assert out.shape == (rows, 75) and out.dtype == torch.float32
        reference = F.linear(x, reference_weight, bias)
        # Up to the threshold, activations rounded to int16 per group (1.5e-5 of the largest); past it,
        # float32 sums.
        assert rel_err(out, reference) < (1e-4 if rows <= 8 else 1e-5), rows
        assert rel_err(out, _expected(x, [weight], bias)) < 2e-2, rows


def _int16_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int16 kernels round it, in float32 as they do: per group of 32, x * (32767 / max
    |x|) to the nearest integer, times max |x| / 32767."""
    groups = x.float().view(x.shape[0], -1, GROUP)
    peak = groups.abs().amax(dim=-1, keepdim=True)
    # A tensor by a tensor: torch's scalar / tensor multiplies by a reciprocal, an ulp off a division.
    inverse = torch.where(peak > 0, torch.full_like(peak, 32767) / peak, 0)
    codes = torch.round(groups * inverse)
    return (codes.double() * (peak / 32767).double()).view_as(x)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("out_features", [75, 16, 160])
def test_int16_rows_are_the_rounded_activations_times_the_codes(type_name, out_features):
    """Every row count runs int16 activations (the GEMV at 1 row, the panel GEMM from 2): the result is
    (x rounded to int16 per group) times scale * code, plus Q4's min times the exact sum of x, to float32
    summation error; a row's result does not depend on the rows beside it, to the bit from 2 rows.
    Without AVX2 + FMA + F16C the kernels' plain loops multiply float32 x instead."""
    int16 = {"avx2", "fma", "f16c"} <= detect_cpu().features
    weight = _tensor(type_name, out_features, 256, seed=4)
    linear = make_linear([weight], None, torch.float32, CPU, quantized=True, max_rows=1 << 30)
    held = linear.dequantize().double()
    mins = torch.zeros_like(held)
    if type_name == "Q4_1":
        mins = linear.scale_min[:, 1].double().repeat_interleave(GROUP, dim=1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 256, generator=gen) * torch.linspace(0.1, 3, 256)
    out = linear(x)
    for rows in (1, 2, 3, 4, 5, 7, 9, 40):
        part = linear(x[:rows])
        rounded = _int16_rounded(x[:rows]) if int16 else x[:rows].double()
        expected = rounded @ (held - mins).T + x[:rows].double() @ mins.T
        assert rel_err(part, expected.float()) < 1e-6, rows
        if rows > 1 or not int16:  # each row's sums in the same order, whichever rows share its step
            assert torch.equal(part, out[:rows]), rows
        else:  # the GEMV sums a group's products in another order
            assert rel_err(part, out[:1]) < 1e-6


def test_fused_parts_and_memory():
    """A Q4_K_M-style fused projection (Q4_K Q/K, Q6_K V) runs each part on its codes; what is held
    stays near the file's bytes."""
    parts = [_tensor("Q4_K", 128, 512, seed=2), _tensor("Q4_K", 64, 512, seed=3), _tensor("Q6_K", 64, 512, 4)]
    linear = make_linear(parts, None, torch.float32, CPU, quantized=True)
    assert isinstance(linear, StackedLinear)
    x = torch.randn(3, 512)
    assert rel_err(linear(x), _expected(x, parts, None)) < 1e-2
    q4 = linear.parts[0]
    assert q4.nbytes <= 1.12 * (parts[0].nbytes + parts[1].nbytes)  # 5 bits per weight against 4.5


def test_bad_shapes_are_refused():
    linear = make_linear([_tensor("Q4_1", 64, 256)], None, torch.float32, CPU, quantized=True)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        torch.ops.duoserve_cpu.q4_matmul(torch.randn(1, 128), linear.codes, linear.scale_min)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.duoserve_cpu.q4_matmul(torch.randn(1, 256).double(), linear.codes, linear.scale_min)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q8_0", "Q6_K"])
def test_rows_are_the_held_weights_rows(type_name):
    """A tied embedding reads its lookups from the lm_head's codes: the same values the matmul uses."""
    linear = make_linear([_tensor(type_name, 64, 256, seed=5)], None, torch.float32, CPU, quantized=True)
    ids = torch.tensor([3, 0, 63, 3])
    assert torch.equal(linear.rows(ids), linear.dequantize()[ids])


# ---- int8 activations (--quantized-activations int8) -------------------------------------------------

INT8_TYPES = ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K"]  # both layouts, each way a file reaches them
ROW_COUNTS = (1, 2, 3, 5, 8)  # blocks of 2 rows of x and a single one; 8 = the threshold below


def _int8_linear(type_name: str, seed: int):
    weight = _tensor(type_name, 75, 256, seed=seed)  # 75 outputs: a partial block of 4 output rows
    return make_linear([weight], None, torch.float32, CPU, quantized=True, max_rows=8, activations="int8")


def _int8_rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded per group of 32 exactly as the kernels do (float32 inverse scale 127 / max |x|, round to
    nearest even), as float64; and each value's rounding bound, half a step of its group (max / 254)."""
    groups = x.view(x.shape[0], -1, GROUP)
    peak = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(peak > 0, torch.full_like(peak, 127) / peak, 0)  # a division, as the kernels
    rounded = torch.round(groups * inverse).double() * (peak / 127).double()
    return rounded.view_as(x), (peak / 254).double().expand_as(groups).reshape_as(x)


@pytest.mark.parametrize("type_name", INT8_TYPES)
def test_int8_activations_equal_integer_math_exactly(type_name):
    """x already on its int8 grid, every scale a power of two: each product and partial sum is exact in
    float32, so the kernel must equal float64 math on the held weights to the bit. Extreme operands
    included: Q4 codes all 15 and Q8 codes all -128 against x of all +127 and all -127 (pmaddubsw
    saturates its int16 pair sums: the sign trick must keep them within 2 * 128 * 127)."""
    gen = torch.Generator().manual_seed(3)
    linear = _int8_linear(type_name, seed=3)
    n, groups = linear.out_features, linear.in_features // GROUP
    scales = torch.pow(2.0, torch.randint(-8, -4, (n, groups), generator=gen).float()).half()
    if isinstance(linear, CpuQ4Linear):
        linear.scale_min[:, 0] = scales
        linear.scale_min[:, 1] = (torch.randint(-16, 17, (n, groups), generator=gen) / 128).half()
        linear.codes[:2] = 0xFF  # every code 15
    else:
        linear.scales.copy_(scales)
        linear.codes[0] = -128
        linear.codes[1] = 127
    for rows in ROW_COUNTS:
        codes = torch.randint(-127, 128, (rows, groups, GROUP), generator=gen)
        codes[:, :, 0] = 127  # every group's largest value on its grid's end: its scale is 2^e exactly
        codes[0], codes[-1] = 127, -127
        x = (codes * torch.pow(2.0, torch.randint(-1, 1, (rows, groups, 1), generator=gen))).view(rows, -1)
        x = x.float()
        expected = F.linear(x.double(), linear.dequantize().double())
        assert torch.equal(linear(x), expected.float()), rows


@pytest.mark.parametrize("type_name", INT8_TYPES)
def test_int8_activations_match_a_reference_of_the_same_rounding(type_name):
    """Random activations: the kernel's result is float64 math on the held weights and the same int8
    rounding of x (Q4's min term included: it multiplies the rounded sum), up to float32 summation order."""
    linear = _int8_linear(type_name, seed=4)
    weight = linear.dequantize().double()
    for rows in ROW_COUNTS:
        x = torch.randn(rows, 256) * torch.linspace(0.1, 3, 256)
        rounded, _ = _int8_rounded(x)
        assert rel_err(linear(x), rounded @ weight.T) < 1e-6, rows


@pytest.mark.parametrize("type_name", INT8_TYPES)
def test_int8_activations_error_is_bounded_by_the_rounding(type_name):
    """Against float32 on the held weights, each output is off by at most its rounding bound: the sum over
    its inputs of |w| times half a step of x's group (max |x| / 254), plus float32 summation. In relative
    terms that is 0.3-0.6% on these random rows, against int16's 1e-5."""
    linear = _int8_linear(type_name, seed=5)
    weight = linear.dequantize().double()
    for rows in ROW_COUNTS:
        x = torch.randn(rows, 256) * torch.linspace(0.1, 3, 256)
        exact = x.double() @ weight.T
        _, half_step = _int8_rounded(x)
        bound = half_step @ weight.abs().T
        error = (linear(x).double() - exact).abs()
        assert torch.all(error <= bound + 1e-5 * exact.abs().max()), rows
        assert 0 < rel_err(linear(x), exact) < 1e-2, rows  # rounded, not float32


def test_int8_is_chosen_per_linear():
    """The setting reaches the kernels: int16 (the default) and int8 linears over the same codes differ
    by the rounding at 1 row, and a 2-row step rounds each row as a 1-row one."""
    weight = _tensor("Q4_1", 64, 256, seed=6)
    int16 = make_linear([weight], None, torch.float32, CPU, quantized=True)
    int8 = make_linear([weight], None, torch.float32, CPU, quantized=True, activations="int8")
    assert (int16.activations, int8.activations) == ("int16", "int8")
    x = torch.randn(2, 256)
    assert not torch.equal(int16(x[:1]), int8(x[:1]))
    assert rel_err(int8(x[:1]), int16(x[:1])) < 1e-2
    assert rel_err(int8(x)[1:], int8(x[1:])) < 1e-6
