"""Per-row quantize/dequantize round trips: one float16 scale per (token, KV head) row."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.quant import QUANTIZED_KV_DTYPES, dequantize, kv_dtype_name, max_code, quantize

DTYPES = list(QUANTIZED_KV_DTYPES.values())
# Worst relative error of one value within range: half an int8 step of the row's largest value; E4M3 has 3
# mantissa bits (half a step: 2^-4 relative), E5M2 2 (2^-3).
RELATIVE_STEP = {torch.int8: 0.5 / 127, torch.float8_e4m3fn: 2.0**-4, torch.float8_e5m2: 2.0**-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=list(QUANTIZED_KV_DTYPES))
def test_round_trip_error_is_within_one_code_step_of_each_row(dtype):
    gen = torch.Generator().manual_seed(0)
    # Rows of very different sizes (per token and per head): each gets its own scale.
    sizes = torch.exp(2 * torch.randn(64, 3, 1, generator=gen)) * torch.tensor([1.0, 10.0, 0.1])[:, None]
    x = torch.randn(64, 3, 16, generator=gen) * sizes
    stored, scale = quantize(x, dtype)
    assert stored.dtype == dtype and stored.shape == x.shape
    assert scale.dtype == torch.float16 and scale.shape == (64, 3)
    amax = x.abs().amax(dim=-1)
    # The row's amax maps to the largest code, up to the scale's float16 rounding (scales stay normal
    # float16 numbers: at least 2^-14).
    assert torch.allclose(scale.float(), (amax / max_code(dtype)).clamp(min=2**-14), rtol=2**-11)
    back = dequantize(stored, scale, torch.float32)
    err = (back - x).abs()
    if dtype == torch.int8:  # uniform steps: at most half a step of each row's scale (+ the amax clamp)
        assert (err <= scale.float()[..., None] * 0.5 * (1 + 1e-3) + amax[..., None] * 2**-11).all()
        full = amax / 127 > 2**-14  # rows above the smallest scale use the whole range
        assert stored.abs().amax(dim=-1)[full].min() >= 126 and stored.min() >= -127
    else:  # relative to each value, above the subnormals
        normal = x.abs() > scale.float()[..., None] * torch.finfo(dtype).tiny * 4
        assert (err[normal] <= x.abs()[normal] * RELATIVE_STEP[dtype] * 1.01).all()
    # The same bytes dequantize to the same values in any dtype (up to that dtype's rounding).
    assert torch.allclose(dequantize(stored, scale, torch.bfloat16).float(), back, rtol=2**-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(QUANTIZED_KV_DTYPES))
def test_zero_and_huge_rows_stay_finite(dtype):
    """A row of zeros gets the smallest scale (no 0 / 0); values past float16's range are clamped."""
    x = torch.tensor([[[0.0, 0.0, 0.0]], [[1e12, -1e12, 0.0]]])
    stored, scale = quantize(x, dtype)
    back = dequantize(stored, scale, torch.float32)
    assert torch.isfinite(scale.float()).all() and (scale > 0).all()
    assert back[0].tolist() == [[0.0, 0.0, 0.0]]
    top = max_code(dtype) * scale[1, 0].item()
    assert back[1].tolist() == [[top, -top, 0.0]]


def test_dtype_names():
    assert kv_dtype_name(torch.float8_e4m3fn) == "fp8_e4m3"
    assert kv_dtype_name(torch.int8) == "int8"
    assert kv_dtype_name(torch.bfloat16) == "bfloat16"
