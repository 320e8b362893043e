"""The quantized linears of float32 models on CPU: GGUF codes read by duoserve's own C++ kernels.

torch's 4/8-bit CPU kernels want bfloat16 activations (15x slower with float32 ones), and a CPU without
fast bfloat16 (AVX2 only: Zen 1-3, Haswell to Ice Lake clients) runs float32 models. Those read dense
float32 weights, 6-8x the bytes of the file's 4-bit codes, in a step whose time is those bytes. The
kernels of `models/csrc/quantized_matmul_cpu.cpp` read the codes with float32 activations instead
(BENCHMARKS.md has the figures):

| GGUF type                  | kept as                                | bits/weight read | file | ratio |
|----------------------------|----------------------------------------|------------------|------|-------|
| Q4_0, Q4_1                 | 4-bit codes, fp16 scale + min per 32   | 5.0              | 4.5-5| 1-1.1 |
| Q4_K                       | 4-bit codes, fp16 scale + min per 32   | 5.0              | 4.5  | 1.11  |
| Q8_0, Q5_0, IQ4_NL         | int8 codes, fp16 scale per 32 (exact)  | 8.5              | 4.5-8.5 | 1.0-1.9 |
| Q6_K, Q5_1, Q5_K, Q3_K, Q2_K | int8 codes re-quantized per 32, fp16 scale | 8.5     | 2.6-6.6 | 1.3-3.2 |

Q4_0, Q4_1, Q8_0, Q5_0 and IQ4_NL are held exactly (their scales are the file's fp16 ones); Q4_K's
scales and mins (an fp16 times a 6-bit integer) are rounded to fp16, a relative error of at most 2^-11
on a group's scale; the others' exact values are re-quantized to int8 per group of 32 (at most half a
step of the group's largest value, 0.4%). Steps of more than `max_rows` rows dequantize tiles of the
weight into one reused float32 buffer and run torch's dense GEMM on them, where the host measurement
found that faster than the kernels (prefill is arithmetic-bound).

Steps of up to `max_rows` rows round their activations for the kernels' integer products
(`activations`, the engine's `--quantized-activations`):

| activations | rows of x                                  | error per value (of its group's max) |
|-------------|--------------------------------------------|--------------------------------------|
| int16       | every row in int16 per 32                  | 1 / 65534 = 1.5e-5                   |
| int8        | every row in int8 per 32 (llama.cpp's q8)  | 1 / 254 = 3.9e-3                     |

int16 costs SmolLM2's float32 logits 1.5e-3 relative error against transformers (a group holding one of
its outlier activations leaves the others ~9 bits; tests/engine/test_smollm2.py) at a mean KL divergence
of 6e-7 (benchmarks/quantized_activations.py), and keeps tiny random models within 1e-4. Several rows run
as an int16 GEMM (pmaddwd) that took 0.50-0.84x the time of float32 tiles + the float32 GEMM at 16-256
rows on an Intel core built for AVX2 and 0.89-1.01x at 1,024-3,800 (two runs; BENCHMARKS.md), so the
host measurement (duoserve/hardware.py, FLOAT32_ROWS) decides how many rows the kernels take. int8 halves
the 1-row kernel's integer work (pmaddubsw: 32 products per instruction, against pmaddwd's 16), which
bounds a decode step on CPUs whose 256-bit integer multiplies are split in two (Zen 1); its cost in
accuracy on the default model (KL divergence of next-token distributions, argmaxes, greedy agreement) is
measured by `benchmarks/quantized_activations.py`, and the host table (duoserve/hardware.py) picks it only
where it is faster and that measurement passes the gate written there (it fails it on SmolLM2). int8's
result is exactly the held weights times the rounded x (Q4's min term multiplies the rounded sum, as
llama.cpp's q8_1 does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duoserve.models.gguf_quants import GGUFTensor
from duoserve.models.linear import QUANTIZED_MAX_ROWS, _QuantizedLinear, _row_chunks

GROUP = 32  # values per group: one scale (and min) each, as GGUF's blocks and sub-blocks of 32
_INT8_MAX = 127
# --quantized-activations -> the kernels' activation_bits.
ACTIVATION_BITS = {"int16": 16, "int8": 8}


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] from codes 0-15 [rows, cols]: in a group, byte i = value i | value i+16 << 4."""
    groups = codes.to(torch.uint8).view(codes.shape[0], -1, GROUP)
    return (groups[..., :16] | (groups[..., 16:] << 4)).reshape(codes.shape[0], -1)


class _CpuQuantizedLinear(_QuantizedLinear):
    """What both formats share: the shape, and building the codes a bounded number of rows at a time."""

    def __init__(self, parts: Sequence[GGUFTensor], bias: torch.Tensor | None) -> None:
        self.in_features = parts[0].cols
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = bias
        self._dtype = torch.float32
        self.max_rows = QUANTIZED_MAX_ROWS
        self.activations = "int16"  # how steps of up to max_rows round x: a key of ACTIVATION_BITS
        self._allocate()
        row = 0
        for part, start, end in _row_chunks(parts):
            self._hold_rows(part, slice(start, end), slice(row, row + end - start))
            row += end - start

    def _allocate(self) -> None:
        raise NotImplementedError

    def _hold_rows(self, part: GGUFTensor, source: slice, rows: slice) -> None:
        """Rows `source` of `part`, held as rows `rows` of this linear."""
        raise NotImplementedError

    @property
    def activation_bits(self) -> int:
        return ACTIVATION_BITS[self.activations]


class CpuQ4Linear(_CpuQuantizedLinear):
    """Q4_0 / Q4_1 / Q4_K: 4-bit codes with an fp16 scale and min per group of 32 (w = scale * q + min)."""

    def _allocate(self) -> None:
        self.codes = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
        # [out, 2, groups]: a row's scales, then its mins, as the kernel reads them.
        self.scale_min = torch.empty(self.out_features, 2, self.in_features // GROUP, dtype=torch.float16)

    def _hold_rows(self, part: GGUFTensor, source: slice, rows: slice) -> None:
        decoded = part.decode(source)
        if decoded.group_size != GROUP:
            raise ValueError(f"{part.type_name} has groups of {decoded.group_size}, not {GROUP}")
        codes, mins = decoded.codes.to(torch.int32), decoded.mins
        if mins is None:  # Q4_0: codes -8..7 with no min; store q + 8 with min = -8 * scale
            codes, mins = codes + 8, -8 * decoded.scales
        self.codes[rows] = _pack_nibbles(codes)
        self.scale_min[rows, 0] = decoded.scales.half()
        self.scale_min[rows, 1] = mins.half()

    def _held(self) -> list[torch.Tensor]:
        return [self.codes, self.scale_min]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.duoserve_cpu.q4_matmul(x, self.codes, self.scale_min, self.activation_bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 weight rows `ids` (a tied embedding's lookups), as the kernels see them."""
        packed = self.codes[ids].view(len(ids), -1, GROUP // 2)
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [n, groups, 32]
        scale_min = self.scale_min[ids].float()
        out = codes * scale_min[:, 0, :, None] + scale_min[:, 1, :, None]
        return out.view(len(ids), self.in_features)

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> None:
        torch.ops.duoserve_cpu.q4_dequantize(self.codes, self.scale_min, start, end, out)


class CpuQ8Linear(_CpuQuantizedLinear):
    """Every other GGUF type: int8 codes with an fp16 scale per group of 32 (w = scale * q)."""

    def _allocate(self) -> None:
        self.codes = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        self.scales = torch.empty(self.out_features, self.in_features // GROUP, dtype=torch.float16)

    def _hold_rows(self, part: GGUFTensor, source: slice, rows: slice) -> None:
        self.codes[rows], self.scales[rows] = _int8_groups(part, source)

    def _held(self) -> list[torch.Tensor]:
        return [self.codes, self.scales]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.duoserve_cpu.q8_matmul(x, self.codes, self.scales, self.activation_bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 weight rows `ids` (a tied embedding's lookups), as the kernels see them."""
        codes = self.codes[ids].view(len(ids), -1, GROUP).float()
        return (codes * self.scales[ids].float()[..., None]).view(len(ids), self.in_features)

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> None:
        torch.ops.duoserve_cpu.q8_dequantize(self.codes, self.scales, start, end, out)


def _int8_groups(part: GGUFTensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp16 scales per group of 32 of `rows`: the file's own where they are exactly that
    (Q8_0, Q5_0, IQ4_NL), else its exact values re-quantized (round to nearest, scale = max / 127)."""
    decoded = part.decode(rows)
    if decoded.group_size == GROUP and decoded.mins is None:
        scales = decoded.scales.half()
        if torch.equal(scales.float(), decoded.scales):
            return decoded.codes.to(torch.int8), scales
    values = decoded.dequantize()
    groups = values.view(values.shape[0], -1, GROUP)
    scales = (groups.abs().amax(dim=-1) / _INT8_MAX).half()
    # Divide by the fp16 scale actually stored, so that codes times it round-trip; an all-zero group
    # keeps scale 0 and codes 0.
    stored = scales.float().clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(groups / stored[..., None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes.view(values.shape), scales
