"""Quantize/dequantize round trips, the scale grid, and the scales file."""

from __future__ import annotations

import json

import pytest
import torch

from duoserve.kv.quant import (
    QUANTIZED_KV_DTYPES,
    KVScales,
    dequantize,
    kv_dtype_name,
    max_code,
    quantize,
    round_scale,
)

DTYPES = list(QUANTIZED_KV_DTYPES.values())
# Worst relative error of one value within range: half an int8 step of the largest value; E4M3 has 3
# mantissa bits (half a step: 2^-4 relative), E5M2 2 (2^-3).
RELATIVE_STEP = {torch.int8: 0.5 / 127, torch.float8_e4m3fn: 2.0**-4, torch.float8_e5m2: 2.0**-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=list(QUANTIZED_KV_DTYPES))
def test_round_trip_error_is_within_one_code_step(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, generator=gen) * torch.tensor([1.0, 10.0, 0.1])[:, None]
    amax = x.abs().amax(dim=(0, 2))
    scale = amax / max_code(dtype)
    stored = quantize(x, scale, dtype)
    assert stored.dtype == dtype and stored.shape == x.shape
    back = dequantize(stored, scale, torch.float32)
    err = (back - x).abs()
    if dtype == torch.int8:  # uniform steps: at most half a step of each head's scale
        assert (err <= scale[:, None] * 0.5 * (1 + 1e-5)).all()
        assert stored.abs().max() == 127 and stored.min() >= -127
    else:  # relative to each value, above the subnormals (which are rare at these scales)
        normal = x.abs() > scale[:, None] * torch.finfo(dtype).tiny * 4
        assert (err[normal] <= x.abs()[normal] * RELATIVE_STEP[dtype] * 1.01).all()
    # The same bytes dequantize to the same values in any dtype (up to that dtype's rounding).
    assert torch.allclose(dequantize(stored, scale, torch.bfloat16).float(), back, rtol=2**-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(QUANTIZED_KV_DTYPES))
def test_values_past_the_range_are_clamped_not_wrapped(dtype):
    scale = torch.tensor([1.0])
    x = torch.tensor([[[1e9, -1e9, 0.0]]])
    back = dequantize(quantize(x, scale, dtype), scale, torch.float32)
    top = max_code(dtype)
    assert back.tolist() == [[[top, -top, 0.0]]]


def test_round_scale_is_on_the_grid_and_never_below():
    for value in [1e-5, 0.0123, 0.5, 1.0, 3.7, 1000.0]:
        rounded = round_scale(value)
        assert value <= rounded < value * 2 ** (1 / 16) * 1.000001
        assert round_scale(rounded) == rounded  # a grid point stays put
    # Two calibrations that differ in the last bits land on the same scale.
    assert round_scale(0.0123) == round_scale(0.0123 * (1 + 1e-7))
    assert round_scale(0.0) > 0


def scales(offset: float = 0.0) -> KVScales:
    return KVScales(((0.1 + offset, 0.2), (0.3, 0.4)), ((0.5, 0.6), (0.7, 0.8)))


def test_scales_from_amax_map_amax_times_margin_to_the_top_code():
    k_amax = torch.tensor([[12.7, 1.27]])
    v_amax = torch.tensor([[448.0, 4.48]])
    s = KVScales.from_amax(k_amax, v_amax, torch.int8, margin=1.0)
    assert s.k[0][0] == pytest.approx(0.1, rel=0.045) and s.k[0][0] >= 0.1
    s = KVScales.from_amax(k_amax, v_amax, torch.float8_e4m3fn, margin=2.0)
    assert s.v[0][0] == pytest.approx(2.0, rel=0.045) and s.v[0][0] >= 2.0
    k, v = s.tensors(torch.device("cpu"))
    assert k.dtype == v.dtype == torch.float32 and k.shape == (1, 2)


def test_digest_names_the_values():
    assert scales().digest == scales().digest
    assert scales().digest != scales(1e-3).digest
    assert len(scales().digest) == 16


def test_scales_file_round_trip_and_checks():
    text = scales().to_json("int8", model="m.gguf")
    assert KVScales.from_json(text, "int8", 2, 2) == scales()
    with pytest.raises(ValueError, match="for kv_cache_dtype int8, not fp8_e4m3"):
        KVScales.from_json(text, "fp8_e4m3", 2, 2)
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        KVScales.from_json(text, "int8", 3, 2)
    with pytest.raises(ValueError, match="not a KV scales file"):
        KVScales.from_json("{}", "int8", 2, 2)
    body = json.loads(text)
    body["v_scale"][0][0] = -1.0
    with pytest.raises(ValueError, match="finite and positive"):
        KVScales.from_json(json.dumps(body), "int8", 2, 2)


def test_dtype_names():
    assert kv_dtype_name(torch.float8_e4m3fn) == "fp8_e4m3"
    assert kv_dtype_name(torch.int8) == "int8"
    assert kv_dtype_name(torch.bfloat16) == "bfloat16"
