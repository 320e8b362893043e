"""Linear layers: dense, and GGUF-quantized weights (Q4_0 / Q4_1, Q8_0) multiplied as 4 and 8-bit.

A decode step multiplies a handful of rows by every weight matrix, so its time is the time to read the
weights: 4-bit codes are a sixth of the float32 bytes and a quarter of the bfloat16 ones. A large step
(prefill) is bound by arithmetic instead, which the dense bfloat16 GEMM does several times faster than
the 4/8-bit kernels (BENCHMARKS.md), so a quantized linear keeps both and picks by the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

GROUP_SIZE = 32  # values per GGUF Q4 block, each with its own scale (and min)
_ZERO_CODE = 8  # torch's int4 kernels dequantize as (code - 8) * scale + zero

# Steps of up to this many rows read the quantized codes; larger ones run the dense GEMM. Measured on a
# 2-core Xeon (AMX): the 4-bit kernel is 2-3x faster at 1-4 rows, and 1.7x slower at 16. The default
# only: engines pass the host's own (duoserve/hardware.py measures it).
QUANTIZED_MAX_ROWS = 8


class _RowTensors:
    """Tensors that all run along a matrix's output rows: row operations apply to each of them."""

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def map_rows(self, fn):
        """The same function (e.g. a row permutation) applied to every tensor."""
        return type(self)(*(fn(t) for t in self.tensors()))

    @classmethod
    def cat(cls, parts: list):
        """Stack matrices along `out` (fused projections)."""
        return cls(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in parts), strict=True)))


@dataclass
class Q4Weight(_RowTensors):
    """A [out, in] matrix in groups of 32 along `in`: value = scale * code + min, codes 0..15."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [out, in // 32]
    mins: torch.Tensor  # float32 [out, in // 32]

    def dequantize(self) -> torch.Tensor:
        groups = self.codes.view(self.codes.shape[0], -1, GROUP_SIZE).float()
        values = groups * self.scales[..., None] + self.mins[..., None]
        return values.view(self.codes.shape)


@dataclass
class Q8Weight(_RowTensors):
    """A [out, in] matrix in groups of 32 along `in`: value = scale * code, codes -128..127."""

    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out, in // 32]

    def dequantize(self) -> torch.Tensor:
        groups = self.codes.view(self.codes.shape[0], -1, GROUP_SIZE).float()
        return (groups * self.scales[..., None]).view(self.codes.shape)


QuantizedWeight = Q4Weight | Q8Weight


def quantized_from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight | None:
    """The codes of a Q4_0 / Q4_1 / Q8_0 tensor; None for other types."""
    if type_name == "Q8_0":
        return q8_from_gguf(data, shape)
    if type_name in ("Q4_0", "Q4_1"):
        return q4_from_gguf(data, type_name, shape)
    return None


def q8_from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Q8_0 block: fp16 d, then 32 int8 codes (value = d * q)."""
    rows, cols = shape
    blocks = np.ascontiguousarray(data).reshape(rows, cols // GROUP_SIZE, 2 + GROUP_SIZE)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return Q8Weight(torch.from_numpy(codes), torch.from_numpy(scales))


def q4_from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Q4Weight:
    """Read Q4_0 / Q4_1 blocks ([rows, bytes] as gguf's reader gives them) without dequantizing.

    Q4_1 block: fp16 d, fp16 m, 16 bytes of codes (value = d * q + m). Q4_0 block: fp16 d and the codes
    (value = d * (q - 8), i.e. min = -8 d). Byte j holds element j in its low nibble, j + 16 in its high.
    """
    rows, cols = shape
    header = {"Q4_0": 2, "Q4_1": 4}[type_name]
    blocks = np.ascontiguousarray(data).reshape(rows, cols // GROUP_SIZE, header + GROUP_SIZE // 2)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        mins = -8.0 * scales
    packed = blocks[..., header:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)
    return Q4Weight(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(mins))


def quantized_kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's CPU int4/int8 kernels are fast for bfloat16 activations only (float32: 10-100x slower)."""
    return device.type == "cpu" and dtype == torch.bfloat16


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _QuantizedLinear(DenseLinear):
    """Dense for steps of many rows; the subclass's kernel over its codes for steps of up to `max_rows`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> None:
        super().__init__(weight, bias)
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return super().__call__(x)
        y = self._few_rows(x.contiguous())
        return y if self.bias is None else y + self.bias

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q4Linear(_QuantizedLinear):
    """x @ W.T (+ bias) with W both 4-bit (for few rows) and dense (for many)."""

    def __init__(
        self,
        q4: Q4Weight,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        max_rows: int = QUANTIZED_MAX_ROWS,
    ) -> None:
        super().__init__(weight, bias, max_rows)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.codes.to(torch.int32), 1)
        zeros = q4.mins + _ZERO_CODE * q4.scales
        # [in // 32, out, 2]: the (scale, zero) pairs the kernel reads, one group row after another.
        pairs = torch.stack([q4.scales, zeros], dim=-1).transpose(0, 1)
        self.scales_and_zeros = pairs.contiguous().to(weight.dtype)

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)


class Int8Linear(_QuantizedLinear):
    """x @ W.T (+ bias) with W both int8 (for few rows) and dense (for many).

    torch's int8 kernel takes one scale per output row, not GGUF's one per 32 values, so Q8_0 codes are
    re-quantized per row: an error of at most half a step of the row's largest value (0.4%), the same
    order as the bfloat16 rounding of the dense copy.
    """

    def __init__(
        self,
        q8: Q8Weight,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        max_rows: int = QUANTIZED_MAX_ROWS,
    ) -> None:
        super().__init__(weight, bias, max_rows)
        values = q8.dequantize()
        scales = values.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.codes = torch.round(values / scales[:, None]).to(torch.int8)
        self.scales = scales.to(weight.dtype)

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)


def make_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantized: QuantizedWeight | None,
    max_rows: int = QUANTIZED_MAX_ROWS,
):
    """The linear for a dense weight and, where the file stored it quantized, its codes (read by steps
    of up to `max_rows` rows)."""
    if isinstance(quantized, Q4Weight):
        return Q4Linear(quantized, weight, bias, max_rows)
    if isinstance(quantized, Q8Weight):
        return Int8Linear(quantized, weight, bias, max_rows)
    return DenseLinear(weight, bias)
