"""GGUF's block-quantized tensors, kept as the file stores them and decoded into integer codes and scales.

Every type supported here decodes, exactly as `gguf.quants.dequantize` does in float32, to

    value = scale[group] * code + min[group]      (min absent for the symmetric types)

with integer codes of at most 8 bits and one scale (and min) per group of 16 or 32 values along a row.
The K-quants' two-level scales (an fp16 `d` per 256 values times a 4/6-bit sub-scale) multiply out to a
float32 scale exactly as gguf computes it (fp16 times a small integer is exact in float32), so the
products and sums below round the same way gguf's do and the values are bit-identical.

A loaded matrix is a `GGUFTensor`: the file's own bytes, one row of blocks per output row, so it holds
exactly the file's bytes, and row operations (llama.cpp's Q/K permutation, fusing Q/K/V) are byte
moves. It is decoded one matrix (or a few embedding rows) at a time when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# type -> (values per block, bytes per block); the K-quants' super-blocks are 256 values.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "IQ4_NL": (32, 18),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
QUANTIZED_TYPES = tuple(BLOCK_LAYOUT)

# Types whose codes take at most 16 values in groups of 32: torch's int4 kernels hold them as they are.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")

# IQ4_NL's non-linear code book (llama.cpp's kvalues_iq4nl).
_IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass
class GroupCodes:
    """A [rows, cols] matrix as value = scale * code + min in groups of `group_size` along each row."""

    codes: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, cols // group_size]
    mins: torch.Tensor | None  # float32 [rows, cols // group_size], or None (symmetric types)
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], bit-identical to gguf.quants.dequantize."""
        rows, cols = self.codes.shape
        groups = self.codes.view(rows, -1, self.group_size).float() * self.scales[..., None]
        if self.mins is not None:
            groups = groups + self.mins[..., None]
        return groups.view(rows, cols)


@dataclass
class GGUFTensor:
    """A quantized [rows, cols] matrix as the file stores it: `raw` is uint8 [rows, bytes per row]."""

    raw: torch.Tensor
    type_name: str
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def map_rows(self, fn) -> GGUFTensor:
        """The same tensor with `fn` (a row permutation, a row selection) applied to its rows of blocks."""
        return GGUFTensor(fn(self.raw), self.type_name, self.cols)

    def decode(self, rows: torch.Tensor | slice | None = None) -> GroupCodes:
        """Integer codes and group scales of all rows, or of the given ones (e.g. embedding lookups)."""
        raw = self.raw if rows is None else self.raw[rows]
        return decode_blocks(raw, self.type_name, self.cols)

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        return self.decode(rows).dequantize()


def check_quantized_shape(type_name: str, shape: tuple[int, ...]) -> None:
    block = BLOCK_LAYOUT[type_name][0]
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(f"a {type_name} tensor must be a matrix of whole {block}-value blocks: {shape}")


def decode_blocks(raw: torch.Tensor, type_name: str, cols: int) -> GroupCodes:
    """Decode uint8 [rows, bytes per row] of `type_name` blocks."""
    if type_name not in _DECODERS:
        raise ValueError(f"unsupported GGUF tensor type {type_name}; supported: {', '.join(QUANTIZED_TYPES)}")
    block, nbytes = BLOCK_LAYOUT[type_name]
    rows = raw.shape[0]
    blocks = raw.reshape(rows * (cols // block), nbytes)
    codes, scales, mins, group = _DECODERS[type_name](blocks)
    return GroupCodes(
        codes.reshape(rows, cols),
        scales.reshape(rows, cols // group),
        None if mins is None else mins.reshape(rows, cols // group),
        group,
    )


# ---------------------------------------------------------------------------------------------------
# Per-type decoders: uint8 [n, bytes per block] -> (codes [n, values], scales [n, groups], mins, group).
# Comments give the block layout; element orders follow gguf/quants.py (and llama.cpp's ggml-quants.c).


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: the low nibbles are elements 0-15, the high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(packed: torch.Tensor, shifts: range, mask: int) -> torch.Tensor:
    """packed [n, ..., k] -> [n, ..., len(shifts), k]: the fields at each shift, one after the other."""
    shift = torch.tensor(list(shifts), dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shift) & mask


def _q4_0(b):  # fp16 d, 16 bytes of nibbles; value = d * (q - 8)
    return _nibbles(b[:, 2:]).to(torch.int8) - 8, _f16(b, 0), None, 32


def _q4_1(b):  # fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m
    return _nibbles(b[:, 4:]).to(torch.int8), _f16(b, 0), _f16(b, 2), 32


def _fifth_bit(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes per block, read as a little-endian uint32 whose bit j is element j's fifth bit."""
    return _bits(qh, range(8), 1).transpose(-1, -2).reshape(qh.shape[0], 32)


def _q5_0(b):  # fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles; value = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_fifth_bit(b[:, 2:6]) << 4)
    return q.to(torch.int8) - 16, _f16(b, 0), None, 32


def _q5_1(b):  # fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles; value = d * q + m
    q = _nibbles(b[:, 8:]) | (_fifth_bit(b[:, 4:8]) << 4)
    return q.to(torch.int8), _f16(b, 0), _f16(b, 2), 32


def _q8_0(b):  # fp16 d, 32 int8 codes; value = d * q
    return b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), None, 32


def _iq4_nl(b):  # fp16 d, 16 bytes of nibbles indexing a code book; value = d * book[q]
    book = torch.tensor(_IQ4_NL_VALUES, dtype=torch.int8)
    return book[_nibbles(b[:, 2:]).long()], _f16(b, 0), None, 32


def _q2_k(b):
    """16 bytes of (4-bit scale | 4-bit min << 4), 64 bytes of 2-bit codes, fp16 d, fp16 dmin;
    value = d * sc * q - dmin * m over 16 groups of 16."""
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    q = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 3).reshape(n, 256)
    return q.to(torch.int8), d * (sc & 0x0F).float(), -(dmin * (sc >> 4).float()), 16


def _q3_k(b):
    """32 bytes of high-bit masks, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, fp16 d;
    value = d * (sc - 32) * q, q = low 2 bits - 4 where the mask bit is 0, over 16 groups of 16."""
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _bits(packed[:, :8], range(0, 8, 4), 0x0F).reshape(n, 16)
    high = _bits(packed[:, 8:], range(0, 8, 2), 0x03).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    ql = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 3).reshape(n, 256)
    qh = _bits(hmask, range(8), 1).reshape(n, 256) ^ 1
    return (ql.to(torch.int8) - (qh << 2).to(torch.int8)), d * sc, None, 16


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes holding eight 6-bit scales and eight 6-bit mins (gguf's get_scale_min)."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mins.float()


def _q4_k(b):
    """fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles;
    value = d * sc * q - dmin * m over 8 groups of 32."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    q = _bits(b[:, 16:].reshape(n, 4, 32), range(0, 8, 4), 0x0F).reshape(n, 256)
    return q.to(torch.int8), d * sc, -(dmin * m), 32


def _q5_k(b):
    """As Q4_K, with 32 bytes of fifth bits (bit i of byte j: element j of group i) before the nibbles."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    ql = _bits(b[:, 48:].reshape(n, 4, 32), range(0, 8, 4), 0x0F).reshape(n, 256)
    qh = _bits(b[:, 16:48], range(8), 1).reshape(n, 256)
    return (ql | (qh << 4)).to(torch.int8), d * sc, -(dmin * m), 32


def _q6_k(b):
    """128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 d;
    value = d * sc * (q - 32) over 16 groups of 16."""
    n = b.shape[0]
    ql = _bits(b[:, :128].reshape(n, 2, 64), range(0, 8, 4), 0x0F).reshape(n, 256)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), range(0, 8, 2), 3).reshape(n, 256)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return (ql | (qh << 4)).to(torch.int8) - 32, _f16(b, 208) * sc, None, 16


_DECODERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


# ---------------------------------------------------------------------------------------------------
# Random blocks, for tests and benchmarks: gguf can quantize only the legacy types, not the K-quants.

# type -> ((byte offset of each fp16 field, its size for values in [-1, 1]), ...): d bounds the largest
# |scale * code| (the min fields, negated, pull codes down to the same range), so values stay in about
# [-1, 1] whatever the random code and sub-scale bytes are.
_FP16_FIELDS: dict[str, tuple[tuple[int, float], ...]] = {
    "Q4_0": ((0, 1 / 8),),
    "Q4_1": ((0, 1 / 8), (2, -1.0)),
    "Q5_0": ((0, 1 / 16),),
    "Q5_1": ((0, 1 / 16), (2, -1.0)),
    "Q8_0": ((0, 1 / 128),),
    "IQ4_NL": ((0, 1 / 127),),
    "Q2_K": ((80, 2 / 45), (82, 1 / 15)),
    "Q3_K": ((108, 1 / 128),),
    "Q4_K": ((0, 2 / (63 * 15)), (2, 1 / 63)),
    "Q5_K": ((0, 2 / (63 * 31)), (2, 1 / 63)),
    "Q6_K": ((208, 1 / (128 * 32)),),
}


def random_blocks(type_name: str, rows: int, cols: int, generator: torch.Generator, scale: float = 1.0):
    """uint8 [rows, bytes per row] of valid `type_name` blocks: random codes and sub-scales, fp16 scales
    drawn so that the values lie in about [-scale, scale]."""
    block, nbytes = BLOCK_LAYOUT[type_name]
    n = rows * (cols // block)
    blocks = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=generator)
    for offset, size in _FP16_FIELDS[type_name]:
        jitter = 0.5 + torch.rand(n, 1, generator=generator)
        blocks[:, offset : offset + 2] = (size * scale * jitter).half().view(torch.uint8)
    return blocks.view(rows, -1)
