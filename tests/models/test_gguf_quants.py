"""GGUF blocks decoded into codes and group scales: bit-identical to gguf's own dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from duoserve.models.gguf_quants import (
    BLOCK_LAYOUT,
    QUANTIZED_TYPES,
    GGUFTensor,
    decode_blocks,
    random_blocks,
)

# Types gguf can quantize itself (the others are built from random blocks).
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _same_bits(ours: torch.Tensor, reference: np.ndarray) -> bool:
    """Bit-identical float32 (torch.equal would also accept -0.0 for 0.0)."""
    return ours.dtype == torch.float32 and np.array_equal(
        ours.numpy().view(np.uint32), reference.view(np.uint32)
    )


def test_every_issue_type_is_supported():
    wanted = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "Q4_0", "Q4_1", "Q8_0"}
    assert wanted == set(QUANTIZED_TYPES)


@pytest.mark.parametrize("type_name", QUANTIZED_TYPES)
def test_random_blocks_decode_exactly_like_gguf(type_name):
    raw = random_blocks(type_name, 6, 512, torch.Generator().manual_seed(1))
    reference = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[type_name])
    decoded = decode_blocks(raw, type_name, 512)
    assert _same_bits(decoded.dequantize(), reference)
    # Codes fit int8, with one scale (and min) per group of 16 or 32.
    assert decoded.codes.dtype == torch.int8 and decoded.group_size in (16, 32)
    assert decoded.scales.shape == (6, 512 // decoded.group_size)


@pytest.mark.parametrize("type_name", QUANTIZED_TYPES)
def test_arbitrary_bytes_decode_exactly_like_gguf(type_name):
    """Every bit pattern of codes and sub-scales (only the fp16 fields are kept finite by random_blocks;
    here they are random too, with non-finite ones masked out of the comparison by gguf's own NaNs)."""
    block, nbytes = BLOCK_LAYOUT[type_name]
    raw = torch.randint(
        0, 256, (4, 2 * nbytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    with np.errstate(all="ignore"):
        reference = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[type_name])
    ours = decode_blocks(raw, type_name, 2 * block).dequantize().numpy()
    finite = np.isfinite(reference)
    assert finite.any()
    assert np.array_equal(np.isfinite(ours), finite)
    assert np.array_equal(ours[finite].view(np.uint32), reference[finite].view(np.uint32))


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_gguf_quantized_matrix_decodes_exactly(type_name):
    x = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(x, qtype)
    assert _same_bits(
        decode_blocks(torch.from_numpy(data), type_name, 96).dequantize(), gguf.quants.dequantize(data, qtype)
    )


def test_real_file_blocks_decode_exactly(smollm2_gguf_path):
    reader = gguf.GGUFReader(smollm2_gguf_path)
    seen = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in seen or name not in QUANTIZED_TYPES:
            continue
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = decode_blocks(torch.from_numpy(np.array(tensor.data)), name, reference.shape[1]).dequantize()
        assert _same_bits(ours, reference), tensor.name
        seen.add(name)
    assert seen == {"Q4_1", "Q8_0"}


def test_row_operations_move_whole_rows():
    raw = random_blocks("Q6_K", 8, 256, torch.Generator().manual_seed(3))
    tensor = GGUFTensor(raw, "Q6_K", 256)
    assert tensor.shape == (8, 256) and tensor.nbytes == 8 * 210
    flipped = tensor.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), tensor.dequantize().flip(0))
    rows = torch.tensor([5, 1, 5])
    assert torch.equal(tensor.dequantize(rows), tensor.dequantize()[rows])


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="unsupported GGUF tensor type IQ2_XXS; supported: Q4_0"):
        decode_blocks(torch.zeros(1, 66, dtype=torch.uint8), "IQ2_XXS", 256)
