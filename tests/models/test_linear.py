"""GGUF codes read without dequantizing, and the 4/8-bit linears against the dense matmul."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duoserve.models.linear import (
    QUANTIZED_MAX_ROWS,
    DenseLinear,
    Int8Linear,
    Q4Linear,
    Q4Weight,
    Q8Weight,
    make_linear,
    quantized_from_gguf,
)
from tests.helpers import rel_err

TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _quantized(type_name: str, rows: int, cols: int, seed: int = 0):
    """(raw GGUF blocks, gguf's own dequantization) of a random matrix."""
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(x, qtype)
    return data, gguf.quants.dequantize(data, qtype)


@pytest.mark.parametrize("type_name", TYPES)
def test_codes_dequantize_exactly_like_gguf(type_name):
    data, reference = _quantized(type_name, 48, 96)
    weight = quantized_from_gguf(data, type_name, reference.shape)
    assert isinstance(weight, Q8Weight if type_name == "Q8_0" else Q4Weight)
    assert torch.equal(weight.dequantize(), torch.from_numpy(reference))


def test_other_types_have_no_codes():
    assert quantized_from_gguf(np.zeros((2, 32), np.float32), "F32", (2, 32)) is None


def test_real_file_codes_match_gguf(smollm2_gguf_path):
    reader = gguf.GGUFReader(smollm2_gguf_path)
    seen = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in seen or name not in TYPES:
            continue
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = quantized_from_gguf(tensor.data, name, reference.shape)
        assert torch.equal(weight.dequantize(), torch.from_numpy(reference)), tensor.name
        seen.add(name)
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("type_name", TYPES)
def test_row_operations_act_on_every_tensor(type_name):
    parts = [quantized_from_gguf(*_pair(type_name, rows, seed)) for seed, rows in enumerate((16, 32))]
    fused = type(parts[0]).cat(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    flipped = fused.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), fused.dequantize().flip(0))


def _pair(type_name: str, rows: int, seed: int):
    data, reference = _quantized(type_name, rows, 64, seed)
    return data, type_name, reference.shape


@pytest.mark.parametrize(("type_name", "cls"), [("Q4_0", Q4Linear), ("Q4_1", Q4Linear), ("Q8_0", Int8Linear)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantized_linear_matches_dense(type_name, cls, with_bias):
    data, reference = _quantized(type_name, 96, 128)
    dense = torch.from_numpy(reference)
    bias = torch.randn(96).bfloat16() if with_bias else None
    linear = make_linear(dense.bfloat16(), bias, quantized_from_gguf(data, type_name, reference.shape))
    assert type(linear) is cls
    for rows in (1, 3, QUANTIZED_MAX_ROWS, QUANTIZED_MAX_ROWS + 1, 40):
        x = torch.randn(rows, 128).bfloat16()
        expected = x.float() @ dense.T + (0 if bias is None else bias.float())
        out = linear(x)
        assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
        # The kernels keep bfloat16 activations, and int8 re-quantizes Q8_0 per row: about 1% either way.
        assert rel_err(out, expected) < 2e-2, rows
        if rows > QUANTIZED_MAX_ROWS:  # large steps run the dense GEMM itself
            assert torch.equal(out, F.linear(x, dense.bfloat16(), bias))


def test_unquantized_weight_is_dense():
    weight = torch.randn(8, 32)
    linear = make_linear(weight, None, None)
    assert type(linear) is DenseLinear
    x = torch.randn(2, 32)
    assert torch.equal(linear(x), F.linear(x, weight))


@pytest.mark.parametrize("max_rows", [0, 2, 16])
def test_row_threshold_is_the_linears_own(max_rows):
    """Each host passes its own threshold (duoserve/hardware.py): codes up to it, the dense GEMM above."""
    data, reference = _quantized("Q4_1", 96, 128)
    dense = torch.from_numpy(reference).bfloat16()
    linear = make_linear(dense, None, quantized_from_gguf(data, "Q4_1", reference.shape), max_rows)
    for rows in (1, 2, 3, 16, 17):
        x = torch.randn(rows, 128).bfloat16()
        expected = F.linear(x, dense) if rows > max_rows else linear._few_rows(x)
        assert torch.equal(linear(x), expected), rows
