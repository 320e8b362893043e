"""Linear layers and the token embedding: dense, or over a GGUF's quantized weights with no dense copy.

A decode step multiplies a handful of rows by every weight matrix, so its time is the time to read the
weights; a large step (prefill) is bound by arithmetic, which the dense GEMM does several times faster
than torch's 4/8-bit kernels (BENCHMARKS.md). A quantized linear keeps only low-bit codes and serves
both: steps of up to QUANTIZED_MAX_ROWS rows run torch's 4/8-bit kernels on the codes, larger ones
dequantize a tile of output rows at a time into one reused scratch buffer and run the dense GEMM on it,
so memory stays proportional to the file (int4 tiles: one pass of a C++ op, int4pack.py; the torch ops
it replaced were 4-7x slower than torch's 4-bit kernel at 8-16 rows, and set the row threshold at 8).

On AVX512-BF16 hosts, duoserve's fused kernels (csrc/int4pack_mm_cpu.cpp, csrc/int8_mm_cpu.cpp) take
the steps of the rows the host measured them fastest at (`fused_rows`, hardware.py): they multiply
bfloat16 x by the codes in place with AVX512-BF16 dot products, each code converted in registers and
read once per step. torch's 4-bit kernel grows with the rows (its time doubles from 8 to 16 to 32) and
the tiles write and read back a bfloat16 copy of every weight; on a 2-core Zen 5 (quiet, 2 threads,
2048 x 16384 matrix) the fused 4-bit kernel took 3.1 ms at 32 rows against 6.7 (torch's kernel) and 8.3
(tiles), 5.9 at 64 against 10.7 (tiles), and a 32-row SmolLM2 decode step went from 52 to 25 ms.

What a decode step reads per weight, against the file (bits per weight, bfloat16 activations):

| GGUF type  | kept as                              | read | file | ratio |
|------------|--------------------------------------|------|------|-------|
| Q4_0       | int4 codes, bf16 scale + zero per 32 | 5.0  | 4.5  | 1.11  |
| Q4_1       | int4 codes, bf16 scale + zero per 32 | 5.0  | 5.0  | 1.00  |
| Q4_K       | int4 codes, bf16 scale + zero per 32 | 5.0  | 4.5  | 1.11  |
| Q8_0       | int8 codes, one scale per row        | 8.0  | 8.5  | 0.94  |
| Q6_K       | int8 codes, one scale per row        | 8.0  | 6.56 | 1.22  |
| Q5_1       | int8 codes, one scale per row        | 8.0  | 6.0  | 1.33  |
| Q5_0, Q5_K | int8 codes, one scale per row        | 8.0  | 5.5  | 1.45  |
| IQ4_NL     | int8 codes, one scale per row        | 8.0  | 4.5  | 1.78  |
| Q3_K       | int8 codes, one scale per row        | 8.0  | 3.44 | 2.33  |
| Q2_K       | int8 codes, one scale per row        | 8.0  | 2.63 | 3.05  |

So a decode step reads at most ~1.2x the file's bytes for Q4_0/Q4_1/Q4_K, Q8_0 and Q6_K (what Q4_K_M,
Q6_K and Q8_0 files are made of), not for the 5-, 3- and 2-bit types nor IQ4_NL: torch has no kernel at
their width. Q4 types map exactly onto torch's int4 groups of 32 (scale = d * sc, zero from the min), up
to the bfloat16 rounding of scale and zero. The others' codes (exact int8 values times a group scale,
see gguf_quants) are re-quantized to torch's int8 layout, one scale per row (Int8Linear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from duoserve import int4pack
from duoserve.int4pack import GROUP_SIZE, TILE_VALUES
from duoserve.int4pack import ZERO_CODE as _ZERO_CODE
from duoserve.models.gguf_quants import INT4_TYPES, GGUFTensor

# Steps of up to this many rows read the quantized codes; larger ones run the dense GEMM on dequantized
# tiles. Measured on a 2-core Xeon (AMX): the 4-bit kernel is 2-3x faster at 1-4 rows, and 1.7x slower
# at 16. The default only: engines pass the host's own (duoserve/hardware.py measures it, the fused
# kernels included).
QUANTIZED_MAX_ROWS = 8

# TILE_VALUES (int4pack.py): values per dequantized tile.
# Rows converted at a time while building a layer: bounds the transient int32/float32 copies of loading
# (a multiple of 64, so that torch's int4 packing of each chunk is the packing of the whole).
_BUILD_ROWS = 256


def quantized_kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """On CPU, bfloat16 models read the codes with torch's int4/int8 kernels (fast for bfloat16 activations
    only: 10-100x slower with float32 ones), float32 models with duoserve's (`cpu_quant_linear`), where
    they build."""
    if device.type != "cpu":
        return False
    if dtype == torch.float32:
        from duoserve.cpu_kernels import cpu_kernels_available

        return cpu_kernels_available()
    return dtype == torch.bfloat16


class _Scratch:
    """One reused buffer per dtype for dequantized tiles: a forward runs one linear at a time."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device, str], torch.Tensor] = {}

    def get(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: str = "tile"
    ) -> torch.Tensor:
        """A [shape] view of the buffer for (dtype, device, role), grown on first need."""
        numel = 1
        for size in shape:
            numel *= size
        key = (dtype, device, role)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # A normal tensor even when first needed under inference mode (the engine's forward): an
            # inference tensor could not be written by a later call made outside it.
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


_scratch = _Scratch()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _tile_rows(cols: int, align: int) -> int:
    return int4pack.tile_rows(cols, align, TILE_VALUES)


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        # A kernel module for steps of few rows, with gemv_chosen(x, w) and gemv(x, w, bias): the GPU's
        # models/triton_gemv, where LlamaModel.triton_gemv puts it; None: torch's matmul for every step.
        self.few_rows = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the weight, all of which a decode step reads."""
        return _nbytes(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.few_rows is not None and self.few_rows.gemv_chosen(x, self.weight):
            return self.few_rows.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class _QuantizedLinear:
    """x @ W.T (+ bias): the subclass's kernel over its codes for few rows, dequantized tiles for many."""

    out_features: int
    in_features: int
    bias: torch.Tensor | None
    tile_align: int = 64
    max_rows: int = QUANTIZED_MAX_ROWS  # steps of up to this many rows run the kernel on the codes
    # Steps of fused_rows[0] to fused_rows[1] rows run duoserve's fused kernel on the codes (bfloat16
    # models, where it builds: `fused`), whatever max_rows says; (0, 0): never.
    fused_rows: tuple[int, int] = (0, 0)
    _fused: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales, all of which a decode step reads."""
        return sum(_nbytes(t) for t in self._held())

    def _held(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = self._product(x)
        return y if self.bias is None else y + self.bias

    @property
    def fused(self) -> bool:
        """Whether duoserve's fused kernel can run this matrix on this host (its range aside)."""
        return self._fused

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.fused_rows
        if self._fused and low <= x.shape[0] <= high and x.dtype == torch.bfloat16:
            return self._fused_rows(x)
        return self._few_rows(x) if x.shape[0] <= self.max_rows else self._many_rows(x)

    def _fused_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:
        step = _tile_rows(self.in_features, self.tile_align)
        if step >= self.out_features:  # one tile: its product is the output, not copied into another
            return self._tile_product(x, 0, self.out_features)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, step):
            end = min(start + step, self.out_features)
            y[:, start:end] = self._tile_product(x, start, end)
        return y

    def _tile_product(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """x times output rows start:end, dequantized into the scratch tile."""
        tile = _scratch.get((end - start, self.in_features), x.dtype, x.device)
        self._dequantize_rows(start, end, tile)
        return F.linear(x, tile)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as the kernels see it (tests, debugging)."""
        out = torch.empty(self.out_features, self.in_features, dtype=self._dtype)
        self._dequantize_rows(0, self.out_features, out)
        return out

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> None:
        raise NotImplementedError


_INT4_BLOCK = int4pack.BLOCK  # rows per block of torch's CPU int4 layout (None: unrecognised)


class Int4Linear(_QuantizedLinear):
    """GGUF Q4_0 / Q4_1 / Q4_K in torch's int4 layout: groups of 32 with a scale and a zero each.

    The fused kernel (int4pack.fused_matmul) multiplies bfloat16 x by the codes in place, dequantizing
    them in registers."""

    def __init__(self, parts: Sequence[GGUFTensor], dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        self.in_features = parts[0].cols
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = bias
        self._dtype = dtype
        groups = self.in_features // GROUP_SIZE
        self.packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
        # [in // 32, out, 2]: the (scale, zero) pairs the kernel reads, one group row after another.
        self.scales_and_zeros = torch.empty(groups, self.out_features, 2, dtype=dtype)
        row = 0
        for part, start, end in _row_chunks(parts):
            decoded = part.decode(slice(start, end))
            # value = scale * q + min = (q - 8) * scale + zero, with zero = min + 8 * scale.
            mins = decoded.mins if decoded.mins is not None else torch.zeros_like(decoded.scales)
            codes = decoded.codes.to(torch.int32)
            if part.type_name == "Q4_0":  # codes -8..7: store q + 8, zero = min
                codes, zeros = codes + _ZERO_CODE, mins
            else:
                zeros = mins + _ZERO_CODE * decoded.scales
            rows = slice(row, row + end - start)
            self.packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.scales_and_zeros[:, rows] = torch.stack([decoded.scales, zeros], dim=-1).transpose(0, 1)
            row += end - start
        # Tiles unpack torch's layout, which needs whole blocks of it (model widths are multiples of 64).
        self._tiles = _INT4_BLOCK is not None and self.out_features % _INT4_BLOCK == 0
        self.tile_align = _INT4_BLOCK or 64
        self._fused = (
            dtype == torch.bfloat16
            and self.out_features % int4pack.FUSED_BLOCK == 0
            and int4pack.fused_matmul_available()
        )

    def _held(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]

    def _fused_rows(self, x: torch.Tensor) -> torch.Tensor:
        return int4pack.fused_matmul(x, self.packed, self.scales_and_zeros)

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tiles:  # torch's kernel on many rows: slower than the dense GEMM, but right
            return self._few_rows(x)
        return super()._many_rows(x)

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> None:
        """(q - 8) * scale + zero in float32, rounded once (int4pack.dequantize_rows: a C++ op where the
        CPU kernels build, torch ops otherwise)."""
        if not self._tiles:
            raise ValueError(f"{self.out_features} rows are not whole blocks of torch's int4 layout")
        int4pack.dequantize_rows(
            self.packed,
            self.scales_and_zeros,
            start,
            end,
            out,
            _INT4_BLOCK,
            lambda shape: _scratch.get(shape, torch.float32, out.device, "float32 tile"),
        )


# What the fused int8 kernel (csrc/int8_mm_cpu.cpp) takes: output rows by 16, columns by 32.
_INT8_FUSED_ROWS, _INT8_FUSED_COLUMNS = 16, 32


def _int8_mm_available() -> bool:
    from duoserve.cpu_kernels import int8_mm_available

    return int8_mm_available()


class Int8Linear(_QuantizedLinear):
    """Every other GGUF type as int8 codes with one scale per output row (torch's int8 kernel).

    torch's int8 kernel takes one scale per output row, not GGUF's one per 16 or 32 values, so the exact
    codes are re-quantized per row: an error of at most half a step of the row's largest value (0.4%);
    on random blocks of every type, 0.6-0.8% relative error of a matmul, 3x that of bfloat16 alone.
    Large steps multiply the codes as dense tiles and apply the row scales to the GEMM's output columns.
    """

    def __init__(self, parts: Sequence[GGUFTensor], dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        self.in_features = parts[0].cols
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = bias
        self._dtype = dtype
        self.codes = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        scales = torch.empty(self.out_features)
        row = 0
        for part, start, end in _row_chunks(parts):
            values = part.dequantize(slice(start, end))
            chunk = values.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            self.codes[row : row + end - start] = torch.round(values / chunk[:, None]).to(torch.int8)
            scales[row : row + end - start] = chunk
            row += end - start
        self.scales = scales.to(dtype)
        self._fused = (
            dtype == torch.bfloat16
            and self.out_features % _INT8_FUSED_ROWS == 0
            and self.in_features % _INT8_FUSED_COLUMNS == 0
            and _int8_mm_available()
        )

    def _held(self) -> list[torch.Tensor]:
        return [self.codes, self.scales]

    def _fused_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.duoserve_cpu.int8_mm(x, self.codes, self.scales)

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> None:
        out.copy_(self.codes[start:end])  # the row scales are applied to the GEMM's output (_tile_product)

    def _tile_product(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return super()._tile_product(x, start, end).mul_(self.scales[start:end])

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self._dtype) * self.scales[:, None]


class StackedLinear:
    """Fused projections whose parts the file stores in different formats (e.g. Q4_K Q/K and a Q6_K V
    in Q4_K_M files): each part runs its own linear, outputs side by side."""

    def __init__(self, parts: list, bias: torch.Tensor | None) -> None:
        self.parts = parts
        self.bias = bias
        self.in_features = parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


def _row_chunks(parts: Sequence[GGUFTensor]):
    """(part, start, end) over every part's rows, a bounded number at a time (multiples of 64, so that
    torch's int4 packing of each chunk is the packing of the whole)."""
    for part in parts:
        for start in range(0, part.shape[0], _BUILD_ROWS):
            yield part, start, min(start + _BUILD_ROWS, part.shape[0])


Weight = torch.Tensor | GGUFTensor


def _family(weight: Weight) -> str:
    if isinstance(weight, torch.Tensor):
        return "dense"
    return "int4" if weight.type_name in INT4_TYPES else "int8"


def dense_weight(weight: Weight, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dense tensor of `dtype` (GGUF-quantized weights dequantized exactly, then rounded)."""
    if isinstance(weight, GGUFTensor):
        weight = weight.dequantize()
    return weight.to(device=device, dtype=dtype)


def make_linear(
    weights: Sequence[Weight],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    quantized: bool,
    max_rows: int = QUANTIZED_MAX_ROWS,
    activations: str = "int16",
    fused_rows: tuple[int, int] | None = None,
):
    """One matmul over `weights` stacked along their outputs (fused Q/K/V, gate/up).

    `quantized`: GGUF-quantized weights stay quantized (Int4Linear / Int8Linear), whose kernels serve
    steps of up to `max_rows` rows (the host's threshold); otherwise they are dequantized into a dense
    weight of `dtype`. `activations`: how float32 models' kernels round x (int16 or int8, see
    cpu_quant_linear); bfloat16 models' kernels take x as it is. `fused_rows`: the range of rows
    bfloat16 models' 4/8-bit linears run duoserve's fused kernels on (None: the host's, hardware.py).
    """
    if not quantized:
        dense = [dense_weight(w, dtype, device) for w in weights]
        return DenseLinear(torch.cat(dense) if len(dense) > 1 else dense[0], bias)
    runs: list[list[Weight]] = []
    for weight in weights:
        if runs and _family(runs[-1][0]) == _family(weight):
            runs[-1].append(weight)
        else:
            runs.append([weight])
    linears = [_make_run(run, dtype, device, max_rows, activations, fused_rows) for run in runs]
    if len(linears) == 1:
        linears[0].bias = bias
        return linears[0]
    return StackedLinear(linears, bias)


def _make_run(
    weights: list[Weight],
    dtype: torch.dtype,
    device: torch.device,
    max_rows: int,
    activations: str = "int16",
    fused_rows: tuple[int, int] | None = None,
):
    family = _family(weights[0])
    if family == "dense":
        return make_linear(weights, None, dtype, device, quantized=False)
    if dtype == torch.float32:
        # Imported here: cpu_quant_linear builds on this module's _QuantizedLinear.
        from duoserve.models.cpu_quant_linear import CpuQ4Linear, CpuQ8Linear

        linear = (CpuQ4Linear if family == "int4" else CpuQ8Linear)(weights, None)
        linear.activations = activations
    else:
        linear = (Int4Linear if family == "int4" else Int8Linear)(weights, dtype, None)
        if linear.fused:
            linear.fused_rows = host_fused_rows(family) if fused_rows is None else fused_rows
    linear.max_rows = max_rows
    if family == "int8" and dtype == torch.bfloat16 and fused_rows is None:
        linear.max_rows = min(max_rows, _host_int8_max_rows(max_rows))
    return linear


def _host_int8_max_rows(default: int) -> int:
    """Where the host measured its 8-bit paths on their own (hardware.py), their threshold: torch's int8
    kernel may lose to the tiles at fewer rows than the 4-bit codes do."""
    from duoserve.hardware import host_defaults

    own = host_defaults().int8_max_rows
    return default if own is None else own


def host_fused_rows(family: str) -> tuple[int, int]:
    """The rows this host runs the fused kernel of `family` (int4, int8) on (hardware.py: measured where
    it measures)."""
    from duoserve.hardware import host_defaults

    defaults = host_defaults()
    return defaults.int4_fused_rows if family == "int4" else defaults.int8_fused_rows


class DenseEmbedding:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class QuantizedEmbedding:
    """Token embeddings kept as the file's blocks: a step decodes only the rows of its tokens (as
    llama.cpp's get_rows), exactly as gguf dequantizes them."""

    def __init__(self, weight: GGUFTensor, dtype: torch.dtype) -> None:
        self.weight = weight
        self.dtype = dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = self.weight.dequantize(unique).to(self.dtype)
        return rows[inverse]


def make_embedding(weight: Weight, dtype: torch.dtype, device: torch.device, quantized: bool):
    if quantized and isinstance(weight, GGUFTensor):
        return QuantizedEmbedding(weight, dtype)
    return DenseEmbedding(dense_weight(weight, dtype, device))
