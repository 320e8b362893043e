"""float32 models' quantized linears (duoserve's C++ kernels) against float32 math on gguf's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.models import linear as linear_module
from duoserve.models.cpu_quant_linear import CpuQ4Linear, CpuQ8Linear
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
    """Every row count: 1 (int16 activations), 2-7 (the float32 blocks of 4, 3, 2 and 1 rows), the
    threshold, and past it (dequantized tiles + GEMM); an odd number of output rows leaves a partial
    block of output rows to every path."""
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
        # One row: activations rounded to int16 per group (1.5e-5 of the largest); else float32 sums.
        assert rel_err(out, reference) < (1e-4 if rows == 1 else 1e-5), rows
        assert rel_err(out, _expected(x, [weight], bias)) < 2e-2, rows


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
