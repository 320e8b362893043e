"""What this host's CPU can do, and the engine defaults that follow from it.

duoserve was first tuned on one CPU, and a rule made there ("bfloat16 only with AMX") left 3-4x on the
table on another (issue 10). So every CPU default is derived here from the CPU's capabilities, by one
table, first matching row wins:

| best capability (level)           | dtype                    | 4/8-bit codes up to      | attention kernel |
|-----------------------------------|--------------------------|--------------------------|------------------|
| AMX-BF16 (amx)                    | bfloat16 (1)             | measured (prior 8)       | avx512_bf16 (7)  |
| AVX512-BF16, no AMX (avx512_bf16) | measured, prior bf16 (2) | measured                 | avx512_bf16 (7)  |
| AVX-512F, no BF16 (avx512)        | measured, prior fp32 (3) | measured, fp32 too (6)   | avx512           |
| AVX2 + FMA (avx2)                 | float32 (4)              | fp32: measured (6)       | avx2             |
| aarch64 with BF16 (neon_bf16)     | measured, prior fp32 (5) | measured, fp32 too (6)   | neon             |
| aarch64 NEON (neon)               | float32                  | fp32: measured (6)       | neon             |
| anything else (generic)           | float32                  | fp32: measured (6)       | generic          |
| a CUDA device                     | bfloat16                 | never (CPU only)         | torch            |

(1) Sapphire Rapids and later: oneDNN's AMX bf16 GEMMs ran 4.7x fp32 at prefill sizes, and the 4-bit
    kernel 3x dense at 1 row (BENCHMARKS.md, machine A). duoserve's fused 4/8-bit kernels multiply on
    AMX tiles there from 3 rows (`fused_amx_rows`): 4-5x their AVX512-BF16 path at 16-64 rows, whose
    dot product runs at a quarter of the float32 FMA's rate on that core (BENCHMARKS.md, machine E).
(2) Zen 4/5, Cooper Lake: on a Zen 5, bf16 ran 3-4x faster than fp32 and the 4-bit codes 3x faster
    again at 1 row (issue 10); measured per host all the same.
(3) Skylake-X, Ice Lake: bf16 is converted in software, so neither dtype wins everywhere.
(4) Haswell and later, Zen 1-3: bf16 GEMMs ran 3-8x slower than fp32 (BENCHMARKS.md, machine B; 6x at
    64 rows on a Zen 1). The 4-bit kernel with bf16 activations ran about as fast as fp32 dense at 1 row
    there and up to 2x faster at 4-8 rows (a busy machine: to re-measure); using it in a float32 model
    would round activations to bf16, so float32 models use duoserve's kernels instead (6).
(5) Neoverse V1/N2, Graviton 3: not measured by us yet.
(6) float32 models read the codes with duoserve's own kernels (models/cpu_quant_linear.py), AVX2 where
    the CPU has it, plain loops elsewhere: on a Zen 1 they beat the float32 GEMM at every size up to 32
    rows, and a SmolLM2 decode step went from 84 to 37 ms (BENCHMARKS.md, machine C). Since their
    several-row path became an int16 GEMM, the measurement times them against float32 tiles + GEMM up
    to prefill chunks of 1,024 rows (FLOAT32_ROWS) and gives them every step where they win at each
    size; without a measurement, 32 rows.
(7) And bfloat16 prefill chunks run duoserve's flash kernel (attention/csrc/prefill_attention_cpu.cpp,
    vdpbf16ps GEMM tiles): 4-6x faster than SDPA's CPU flash kernel on a Zen 5 (350-520 against
    40-134 GFLOP/s; BENCHMARKS.md, machine D). Where the kernel builds (AVX512-BF16, so the amx row too)
    the measurement times both on a 256-token prompt and the faster runs them; the priors (no
    measurement): ours on this row, SDPA's with AMX, whose kernel multiplies on AMX tiles there (torch
    packs for oneDNN's brgemm only with AMX; on machine E, an AMX Xeon, it won: 1.08-1.16 against
    2.18-2.31 ms). Without AVX512-BF16 the kernel is not built: SDPA.

Those kernels round activations to int16 or int8 for their integer products (`--quantized-activations`;
cpu_quant_linear.py). `auto` takes int8 only on a table row where it was measured faster than int16 and
its accuracy passed the gate below on the default model (`benchmarks/quantized_activations.py`):

| table row                | float32 models' activations  | why                                          |
|--------------------------|------------------------------|----------------------------------------------|
| avx2                     | int16                        | int8 faster (Q4 1.3-1.4x, Zen 1), fails gate  |
| amx, avx512_bf16, avx512 | int16                        | same kernels (VNNI where built), not measured |
| neon_bf16, neon, generic | int16 (float32: plain loops) | no SIMD integer path: int8 saves nothing      |

On a Zen 1 (machine C) the int8 kernels ran Q4 groups 1.3-1.4x faster than int16 at 1 row (576x576:
56 -> 42 us, 1536x576: 137 -> 98 us, one thread, p10) and Q8 ones at par; but int8 fails the gate on the
default model: llama.cpp's rounding (int8 per group of 32) gave a mean KL divergence of 3.0e-3, changed
2% of the next-token argmaxes and the greedy text after 16 tokens, and no int8 rounding a kernel could run
for less than int16's products keeps every argmax (`benchmarks/activation_rounding.py`: int8 on one kind
of matmul only, groups of 16, a second int8 pass over the residual of groups with outliers, outliers kept
in float32: 0.4-3.5% of argmaxes changed; BENCHMARKS.md, 2026-12-05). INT8_ACTIVATIONS stays empty;
`--quantized-activations int8` opts in.

The gate (INT8_GATE, passes_int8_gate): against dense float32 on SmolLM2-135M Q4_1, mean KL divergence of
the next-token distributions at most 1e-3 (llama.cpp rounds activations to the same q8 blocks), p99 at
most 1e-2, and, as the project's accuracy rule asks of every path, the same argmax at every position and
the same greedy tokens (int16 keeps both).

"4/8-bit codes up to": in a bfloat16 model, steps of up to that many rows read the GGUF 4/8-bit codes
with torch's kernels or, at the rows measured faster, duoserve's fused ones (AVX512-BF16 hosts, and
AVX512-VBMI for the 4-bit one; see below); "fp32:" the same in a float32 model, with duoserve's. The
attention kernel is compiled -march=native, so its ISA follows the host: the column says which of its
fast paths (AVX-512 with or without AVX512-BF16 dot products, AVX2, or the auto-vectorized generic
loop) runs.

The 4/8-bit kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) accept float32 activations
too, but ran 15x slower with them than with bfloat16 (a Zen 1, `benchmarks/quantized_activations.py
--formats`), so they are used only when the model runs in bfloat16.

"Measured": where the capabilities leave a choice open, a short measurement at first start decides it
(`measure_formats`: float32 and bfloat16 matmuls of 1 and 64 rows, and the 4-bit codes at 1-64 rows
every way a bfloat16 model runs them, the 8-bit ones too where the fused kernels build, weights twice
the L3 cache; `duoserve env` took 5.4 s with it on a busy 2-core Zen 5 before the fused kernels, 2.6 s
with the measurement of 1-16 rows before that), cached on disk per
CPU (its flags) and torch version, like the attention kernel's build, and measured again when the
cache is of another MEASUREMENT_VERSION.
The decision from the timings (`decide`) is a pure function: dtype = the one whose product of decode
time (1 row, its fastest kernel) and prefill time (64 rows, dense) is smaller; the row threshold = the
most rows up to which the 4-bit codes (torch's kernel, or the fused one where timed) beat, at every
measured size (DECODE_ROWS), what the engine runs above the threshold: dequantized tiles and the dense
GEMM on each (models/linear.py keeps no dense copy). The fused kernels' ranges (`fused_rows`) = the run
of measured sizes, ending at the largest where it wins, at which each beats what would run instead
(torch's kernel up to the threshold, tiles above); the 8-bit codes get their own threshold from their
own timings (torch's int8 kernel, int8 tiles, the fused int8 kernel). Comparing with a dense GEMM on a
ready matrix instead, as before, chose 8 rows on a Zen 5 where the tiles, then dequantized by torch
ops, were 4-7x slower than the kernel at 8-16 rows; with
duoserve's C++ dequantization (int4pack.py) the kernel wins up to 16 rows and ties at 32
(`benchmarks/int4_tiles.py --threads 1`, p10 ms per 2048 x 16384 matrix, a busy 2-core Zen 5):

| rows                               | 1     | 8     | 16    | 32    | 64    |
|------------------------------------|-------|-------|-------|-------|-------|
| q4: torch's 4-bit kernel           | 0.99  | 3.55  | 7.00  | 13.66 | 28.27 |
| tiles, C++ dequantization          | 13.44 | 10.15 | 11.52 | 13.33 | 17.75 |
| tiles, torch ops (before)          | 77.07 | 48.89 | 52.44 | 51.50 | 62.76 |
| dense GEMM on a ready matrix       | 4.02  | 4.23  | 6.98  | 11.02 | 12.20 |

The fused 4-bit kernel (models/csrc/int4pack_mm_cpu.cpp) then beat both from 4 rows on: the same
benchmark, on a machine with another job at times (p10 ms, one thread), and the first-start measurement
on a quiet one (2 threads; it chose codes up to 64 rows, the fused 4-bit kernel at 4-64, the 8-bit one
at 16-64: at 32 rows 4.2 ms against 7.0 for int8 tiles and 8.3 for torch's int8 kernel):

| rows                               | 1     | 8     | 16    | 32    | 64    |
|------------------------------------|-------|-------|-------|-------|-------|
| q4, one thread                     | 0.95  | 3.18  | 6.37  | 12.65 | 25.25 |
| fused, one thread                  | 0.89  | 1.95  | 3.74  | 6.65  | 11.35 |
| tiles, one thread                  | 8.64  | 9.38  | 10.38 | 12.74 | 16.63 |
| q4, 2 threads (measure_formats)    | 0.47  | 1.65  | 3.46  | 6.74  | 13.64 |
| fused, 2 threads                   | 0.49  | 0.86  | 1.53  | 3.05  | 5.94  |
| tiles, 2 threads                   | 6.21  | 6.06  | 6.64  | 8.30  | 10.67 |

Since 2026-12-04 both fused kernels unpack the codes in registers instead of into an L1 buffer (the
4-bit one at every row count, the 8-bit one up to 24 rows), and at 1-4 rows they beat torch's kernels
too: measure_formats on machine D (2 threads, MEASUREMENT_VERSION 4) chose the fused 4-bit kernel at
1-64 rows and the 8-bit one at 1-32 (ms per matrix):

| rows                               | 1     | 4     | 8     | 16    | 32    | 64    |
|------------------------------------|-------|-------|-------|-------|-------|-------|
| q4: torch's 4-bit kernel           | 0.63  | 0.93  | 2.15  | 4.24  | 9.25  | 16.77 |
| fused 4-bit                        | 0.36  | 0.47  | 0.88  | 1.64  | 3.25  | 6.10  |
| q8: torch's 8-bit kernel           | 1.30  | 1.45  | 2.13  | 4.57  | 8.74  | 20.99 |
| fused 8-bit                        | 0.62  | 0.85  | 1.61  | 3.20  | 5.93  | 9.83  |
| 8-bit tiles                        | 4.85  | 4.56  | 4.35  | 5.51  | 6.85  | 8.86  |

MEASUREMENT_VERSION 5 (tiles of 2 M values; the prefill attentions timed) on the same machine, a faster
minute: fused 8-bit 6.89 ms against 7.22 for the tiles at 64 rows, so the 8-bit range became 1-64 (the
64-row decision is within this VM's noise on this matrix); prefill attention, 256 tokens of 32 query heads
over 8 KV heads: duoserve's kernel 0.85 ms, SDPA 3.87.

`DUOSERVE_HOST_MEASURE=0` skips the measurement (priors only); `DUOSERVE_CACHE_DIR` moves the cache;
`DUOSERVE_PREFILL_ATTENTION=duoserve|sdpa` overrides the measured prefill attention (to compare both).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from duoserve import int4pack
from duoserve.cpu_kernels import (
    EMULATED_ISAS,
    cpu_kernels_available,
    emulated_isa,
    fused_amx_rows,
    int8_mm_available,
    prefill_attention_available,
)

logger = logging.getLogger(__name__)

# The features the table reads, as Linux's /proc/cpuinfo names them (x86 "flags", aarch64 "Features").
X86_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512vbmi", "avx2", "fma", "f16c")
ARM_FEATURES = ("asimd", "bf16", "sve", "i8mm")

# The row threshold's prior where no measurement ran: measured on a 2-core Xeon with AMX, where the
# 4-bit kernel was 2-3x faster than dense at 1-4 rows and 1.7x slower at 16 (BENCHMARKS.md).
PRIOR_QUANTIZED_MAX_ROWS = 8
# In float32 models, steps of up to this many rows read the codes with duoserve's kernels; larger ones
# run the dense GEMM on dequantized tiles. On a 2-core Zen 1 the kernels beat the float32 GEMM at every
# size up to 32 rows (1 row: 2.2x; 32 rows: 1.3x; BENCHMARKS.md), and tiles + GEMM win from 64.
PRIOR_FLOAT32_QUANTIZED_MAX_ROWS = 32
# Table rows whose float32 models round activations to int8 by default, and the measurement that says so.
INT8_ACTIVATIONS: dict[str, str] = {}
INT8_GATE = {"mean_kld": 1e-3, "p99_kld": 1e-2, "top1": 1.0}  # what int8 must pass (see above)

# Below the largest size it wins at, a fused kernel within this fraction of the other path's time keeps its
# run going: a tie inside a run is noise, not a reason to switch kernels twice. On machine E (an AMX Xeon)
# the fused 8-bit kernel took 8.40 ms at 8 rows against torch's 8.33, while winning at 1, 4 and 16 (2.57
# vs 4.07, 4.32 vs 4.46, 16.13 vs 19.61): a strict comparison gave it 16-16 rows.
FUSED_TIE = 0.05
# Candidate row thresholds, timed for the 4-bit kernel and for what the engine runs above the threshold
# (dequantized tiles and the dense GEMM).
DECODE_ROWS = (1, 4, 8, 16, 32, 64)
PREFILL_ROWS = 64  # a many-row step, where GEMM arithmetic rather than weight bytes sets the time
# float32 models' 4/8-bit kernels (duoserve's, int16 activations) against float32 tiles + the float32
# GEMM: decode sizes and prefill chunks'. Where the kernels win at every one they run every step, at
# most ALL_ROWS rows (more than any step has): on an Intel core built for AVX2 their int16 GEMM took
# 0.50-0.84x the tiles' time at 16-256 rows and 0.89-1.01x at 1,024-3,800 (two runs; BENCHMARKS.md).
FLOAT32_ROWS = (*DECODE_ROWS, 256, 1024)
ALL_ROWS = 1 << 30
# The prompt length the two prefill attentions are timed at (footnote 7 above).
PREFILL_QUERIES = 256
# Where no measurement ran, bfloat16 models' 4-bit and 8-bit linears run duoserve's fused kernels
# (int4pack.fused_matmul; models/csrc/int8_mm_cpu.cpp) on steps of this many rows, on CPUs they are
# built for (AVX512-BF16, and VBMI for the 4-bit one): the ranges machine D measured (module docstring).
PRIOR_INT4_FUSED_ROWS = (1, 64)
PRIOR_INT8_FUSED_ROWS = (1, 32)
# What the cached timings measured: a cache of another version is measured again. 2: the many-rows
# path is timed as the engine runs it (tiles), at up to 64 rows (1 compared with a dense matrix); 3: and
# the fused kernels where they build, with the 8-bit codes' other two paths; 4: the fused kernels
# unpack in registers at every row count (2026-12-04: 1.35-2x faster at 1-16 rows, so their range moves);
# 5: the tiles hold 2 M values, not 1 M (int4pack.TILE_VALUES), and the prefill attentions are timed;
# 6: the fused 4-bit and 8-bit kernels multiply on AMX tiles from 3 rows where they can (4-5x at 16-64 rows);
# 7: float32 models' kernels (an int16 GEMM at several rows) against float32 tiles, on every host.
MEASUREMENT_VERSION = 7


@dataclass(frozen=True)
class CpuInfo:
    """The host's CPU as far as the defaults care."""

    arch: str  # platform.machine(): x86_64, aarch64, ...
    model: str
    features: frozenset[str]  # of X86_FEATURES / ARM_FEATURES
    torch_capability: str  # the ISA torch's own kernels dispatch to (torch.backends.cpu)
    cores: int  # physical cores this process may use (affinity, cgroup quota)
    l3_bytes: int = 32 << 20

    @property
    def level(self) -> str:
        """The table's row: the best capability the CPU has."""
        f = self.features
        if self.arch in ("x86_64", "AMD64", "i686"):
            for level, needs in (
                ("amx", {"amx_bf16", "amx_tile"}),
                ("avx512_bf16", {"avx512_bf16", "avx512f"}),
                ("avx512", {"avx512f"}),
                ("avx2", {"avx2", "fma"}),
            ):
                if needs <= f:
                    return level
        if self.arch in ("aarch64", "arm64"):
            return "neon_bf16" if {"asimd", "bf16"} <= f else "neon" if "asimd" in f else "generic"
        return "generic"

    def summary(self) -> str:
        """e.g. 'AMD EPYC (x86_64: avx2,fma,f16c; no avx512/amx)'."""
        names = [n for n in (*X86_FEATURES, *ARM_FEATURES) if n in self.features]
        missing = [n for n in ("avx512", "amx") if not any(f.startswith(n) for f in self.features)]
        tail = f"; no {'/'.join(missing)}" if missing and self.arch == "x86_64" else ""
        return f"{self.model} ({self.arch}: {','.join(names) or 'no SIMD features'}{tail})"


@dataclass(frozen=True)
class Rule:
    """One row of the table: the dtype (or its prior, if `measure`), and why."""

    dtype: torch.dtype
    measure: bool  # capabilities leave the dtype open: time both at first start
    attention_isa: str
    reason: str
    prefill_attention: str = "sdpa"  # bfloat16 prefill chunks: one of PREFILL_ATTENTION


_BF16, _FP32 = torch.bfloat16, torch.float32
# Who runs bfloat16 prefill chunks' attention: duoserve's flash kernel (where built) or torch's SDPA.
PREFILL_ATTENTION = ("duoserve", "sdpa")
RULES: dict[str, Rule] = {
    "amx": Rule(_BF16, False, "avx512_bf16", "AMX: bf16 GEMMs 4.7x fp32 (BENCHMARKS.md)"),
    "avx512_bf16": Rule(
        _BF16, True, "avx512_bf16", "AVX512-BF16 without AMX: bf16 3-4x fp32 on Zen 5", "duoserve"
    ),
    "avx512": Rule(_FP32, True, "avx512", "AVX-512 without BF16: bf16 converted in software"),
    "avx2": Rule(_FP32, False, "avx2", "AVX2 only: bf16 GEMMs 3-8x slower than fp32"),
    "neon_bf16": Rule(_FP32, True, "neon", "aarch64 BF16: not measured by us"),
    "neon": Rule(_FP32, False, "neon", "aarch64 without BF16"),
    "generic": Rule(_FP32, False, "generic", "no SIMD features known to us"),
}

# Seconds per call of a matmul, keyed (format, rows); format is float32, bfloat16 (dense), q4 (torch's
# 4-bit kernel on the codes, bfloat16 activations) or tiles (the many-rows path of the same codes:
# dequantized tiles and the dense bfloat16 GEMM on each, as models/linear.py runs it) or fused
# (duoserve's fused kernel on the codes, where it builds).
Timings = Mapping[tuple[str, int], float]


@dataclass(frozen=True)
class HostDefaults:
    """What an engine on this host runs unless told otherwise."""

    cpu: CpuInfo
    dtype: torch.dtype
    # In a bfloat16 model, steps of up to this many rows read the 4/8-bit codes with torch's kernels
    # (0: never); in a float32 model, up to float32_quantized_max_rows with duoserve's.
    quantized_max_rows: int
    num_threads: int
    attention_isa: str  # the fast path the paged attention kernel (-march=native) compiles in
    reason: str
    prefill_attention: str = "sdpa"  # bfloat16 prefill chunks: duoserve's flash kernel or SDPA (Rule)
    measured_on: str | None = None  # the date of the measurement that decided, if one did
    timings: Mapping[str, float] = field(default_factory=dict)
    float32_quantized_max_rows: int = PRIOR_FLOAT32_QUANTIZED_MAX_ROWS
    # How float32 models' kernels round activations (int16 or int8): INT8_ACTIVATIONS.
    quantized_activations: str = "int16"
    # bfloat16 models' 4-bit linears run duoserve's fused kernel on steps of [low, high] rows ((0, 0):
    # never), before the threshold above is consulted.
    int4_fused_rows: tuple[int, int] = (0, 0)
    int8_fused_rows: tuple[int, int] = (0, 0)  # and the 8-bit ones
    # bfloat16 models' 8-bit linears read their codes (fused kernel or torch's) up to this many rows,
    # and at most quantized_max_rows: their own measurement, where it ran (None: quantized_max_rows).
    int8_max_rows: int | None = None
    # The fused kernels multiply on AMX tiles from this many rows (0: never; cpu_kernels.fused_amx_rows).
    fused_amx_rows: int = 0

    def quantized_max_rows_for(self, dtype: torch.dtype) -> int:
        """Rows up to which a model of `dtype` reads its 4/8-bit codes (0: never)."""
        if dtype == _FP32:
            return self.float32_quantized_max_rows
        return self.quantized_max_rows if dtype == _BF16 else 0

    def describe(self) -> str:
        """The startup log line (and `duoserve env`'s first line)."""
        dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype == _FP32:
            rows = self.float32_quantized_max_rows
            upto = "at every row count" if rows >= ALL_ROWS else f"up to {rows} rows"
            activations = self.quantized_activations
            codes = f"4/8-bit codes {upto} (duoserve's float32 kernels, {activations} activations)"
        elif self.dtype != _BF16:
            codes = "no 4/8-bit decode kernels"
        elif self.quantized_max_rows:
            codes = f"4/8-bit decode kernels up to {self.quantized_max_rows} rows"
            if self.int8_max_rows is not None and self.int8_max_rows < self.quantized_max_rows:
                codes += f" (8-bit: {self.int8_max_rows})"
        else:
            codes = "no 4/8-bit decode kernels (slower than dense here)"
        for bits, (low, high) in ((4, self.int4_fused_rows), (8, self.int8_fused_rows)):
            if self.dtype == _BF16 and high:
                codes += f", fused {bits}-bit kernel at {low}-{high} rows"
        if self.dtype == _BF16 and self.fused_amx_rows and max(self.int4_fused_rows + self.int8_fused_rows):
            codes += f" (on AMX tiles from {self.fused_amx_rows} rows)"
        why = self.reason if self.measured_on is None else f"measured {self.measured_on}: {self.reason}"
        return (
            f"host: {self.cpu.summary()}, {self.num_threads} threads -> dtype {dtype}, {codes}, "
            f"attention kernel {self.attention_isa}, prefill attention {self.prefill_attention} ({why})"
        )


def passes_int8_gate(mean_kld: float, p99_kld: float, top1: float, greedy_identical: bool) -> bool:
    """Whether a rounding of float32 models' activations is accurate enough to be a default: INT8_GATE's
    divergences, the same argmax at every position (top1, a share) and the same greedy tokens."""
    gate = INT8_GATE
    within = mean_kld <= gate["mean_kld"] and p99_kld <= gate["p99_kld"]
    return within and top1 >= gate["top1"] and greedy_identical


def decide(rule: Rule, timings: Timings | None) -> tuple[torch.dtype, int, str]:
    """dtype, bfloat16's quantized row threshold and the reason, for a table row given the timings
    (None: the priors). The threshold is for bfloat16 models, whatever the default dtype: an explicit
    `--dtype bfloat16` uses it too."""
    if timings is None:
        return rule.dtype, PRIOR_QUANTIZED_MAX_ROWS, rule.reason
    dtype, reason = rule.dtype, rule.reason
    if rule.measure:
        fp32 = timings["float32", 1] * timings["float32", PREFILL_ROWS]
        decode = min(timings["bfloat16", 1], timings["q4", 1], timings.get(("fused", 1), math.inf))
        bf16 = decode * timings["bfloat16", PREFILL_ROWS]
        dtype = _BF16 if bf16 < fp32 else _FP32
        faster = "bf16" if dtype == _BF16 else "fp32"
        reason = f"{faster} {math.sqrt(max(fp32, bf16) / min(fp32, bf16)):.1f}x faster (decode x prefill)"
    speedup = timings["bfloat16", 1] / timings["q4", 1]
    return dtype, codes_threshold(timings), f"{reason}; 4-bit {speedup:.1f}x bf16 dense at 1 row"


def codes_threshold(timings: Timings, bits: int = 4) -> int:
    """The most rows up to which the 4-bit (8-bit) codes, torch's kernel or the fused one where it was
    timed, beat the tiles at every measured size (DECODE_ROWS). The fused kernel counts: an engine
    whose threshold is 0 loads dense weights, and the fused kernel never runs."""
    kernels, tiles = (("q4", "fused"), "tiles") if bits == 4 else (("q8", "fused8"), "tiles8")
    rows = 0
    for r in DECODE_ROWS:
        if min(timings.get((kernel, r), math.inf) for kernel in kernels) >= timings[tiles, r]:
            break
        rows = r
    return rows


def fused_rows(timings: Timings, max_rows: int, bits: int = 4) -> tuple[int, int]:
    """The rows bfloat16 models' 4-bit (8-bit) linears run a fused kernel on, from the timings: the run
    of consecutive measured sizes, ending at the largest where it wins, at which it beats what would run
    instead (torch's kernel up to `max_rows`, tiles above) or ties with it (FUSED_TIE). (0, 0) where it
    never wins or was not timed. Sizes between two measured ones take the fused kernel only inside the
    run."""
    fused, codes, tiles = ("fused", "q4", "tiles") if bits == 4 else ("fused8", "q8", "tiles8")

    def wins(rows: int, margin: float = 1.0) -> bool:
        if (fused, rows) not in timings:
            return False
        return timings[fused, rows] < margin * timings[codes if rows <= max_rows else tiles, rows]

    won = [rows for rows in DECODE_ROWS if wins(rows)]
    if not won:
        return 0, 0
    high = low = won[-1]
    for rows in reversed(DECODE_ROWS[: DECODE_ROWS.index(high)]):
        if not wins(rows, 1 + FUSED_TIE):
            break
        low = rows
    return low, high


def fused_capable(cpu: CpuInfo, bits: int = 4) -> bool:
    """Whether the fused 4-bit (8-bit) kernel is built for this CPU (models/csrc/int4pack_mm_cpu.cpp,
    int8_mm_cpu.cpp)."""
    needs = {"avx512_bf16", "avx512f"} | ({"avx512vbmi"} if bits == 4 else set())
    return needs <= cpu.features


def defaults_for(cpu: CpuInfo, measure: Callable[[CpuInfo], Timings] | None) -> HostDefaults:
    """The defaults for a CPU; `measure` (None: priors only) decides what the table leaves open."""
    rule = RULES[cpu.level]
    # Every row leaves thresholds open: bfloat16's (a `--dtype bfloat16` model on any row) and float32's
    # (where the float32 kernels build); the dtype only where `rule.measure`.
    timings = measure(cpu) if measure is not None else None
    dtype, rows, reason = decide(rule, timings)
    rows8 = None
    if timings is not None:
        rows8 = codes_threshold(timings, bits=8) if ("q8", 1) in timings else None
        fused, fused8 = fused_rows(timings, rows), fused_rows(timings, rows8, bits=8)
    else:
        fused = PRIOR_INT4_FUSED_ROWS if fused_capable(cpu) else (0, 0)
        fused8 = PRIOR_INT8_FUSED_ROWS if fused_capable(cpu, bits=8) else (0, 0)
    return HostDefaults(
        cpu=cpu,
        dtype=dtype,
        quantized_max_rows=rows,
        num_threads=cpu.cores,
        attention_isa=rule.attention_isa,
        reason=reason,
        prefill_attention=prefill_attention(rule, timings),
        measured_on=None if timings is None else _cached_date(cpu) or datetime.date.today().isoformat(),
        timings={f"{fmt}@{rows}": t for (fmt, rows), t in (timings or {}).items()},
        quantized_activations="int8" if cpu.level in INT8_ACTIVATIONS else "int16",
        int4_fused_rows=fused,
        int8_fused_rows=fused8,
        int8_max_rows=rows8,
        float32_quantized_max_rows=(
            float32_codes_threshold(timings)
            if timings is not None and ("f32codes", 1) in timings
            else PRIOR_FLOAT32_QUANTIZED_MAX_ROWS
        ),
    )


# ---------------------------------------------------------------------------------------- detection


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _features(arch: str, cpuinfo: Mapping[str, str], amx_permitted: bool) -> frozenset[str]:
    """The table's features among /proc/cpuinfo's; torch's own probes where that lists none (no /proc).
    AMX also needs the kernel's permission (arch_prctl), which torch's probe asks for."""
    listed = set((cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    found = {f for f in (*X86_FEATURES, *ARM_FEATURES) if f in listed}
    if arch == "x86_64" and not listed:
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported"}
        probes["avx512_bf16"] = "_is_avx512_bf16_supported"
        found |= {f for f, name in probes.items() if getattr(torch.cpu, name, lambda: False)()}
        if "avx2" in found:
            found |= {"fma", "f16c"}  # every AVX2 CPU has them
        if amx_permitted:
            found |= {"amx_bf16", "amx_tile"}
    if not amx_permitted:
        found -= {"amx_bf16", "amx_tile"}
    isa = emulated_isa() if arch == "x86_64" else None
    if isa is not None:  # DUOSERVE_CPU_ISA: run as that level (cpu_kernels.py)
        found &= set(EMULATED_ISAS[isa][1])
    return frozenset(found)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs the cgroup's quota allows (v2 cpu.max, or v1 cfs quota/period), rounded up; None: no limit."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            parts = (root / quota_file).read_text().split()
            if period_file is not None:
                parts.append((root / period_file).read_text().strip())
        except OSError:
            continue
        if len(parts) < 2 or parts[0] in ("max", "-1"):
            return None
        return max(1, math.ceil(int(parts[0]) / int(parts[1])))
    return None


def cgroup_memory_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the cgroup may still allocate (v2 memory.max - memory.current, or v1's limit - usage); None
    where no limit is set. In a container /proc/meminfo shows the node's memory, not the pod's limit: a
    KV cache sized from it alone got the pod OOM-killed."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        # v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages), v2 as "max".
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            return None
        return max(0, int(limit_text) - usage)
    return None


def usable_cores() -> int:
    """Physical cores of the CPUs this process may run on, capped by the cgroup's quota.

    GEMMs gain nothing from a core's second hyperthread, and a container limited to 2 CPUs of a
    64-core host must not start 64 threads that the quota then stalls.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("?", str(cpu)))
    count = len(cores) or os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(count, limit) if limit else count


def _l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 32 << 20
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


@functools.cache
def detect_cpu() -> CpuInfo:
    arch = platform.machine()
    info = _cpuinfo_fields()
    model = info.get("model name") or info.get("CPU part") or platform.processor() or arch
    if arch == "x86_64" and emulated_isa() is not None:
        model += f" as {emulated_isa()} (DUOSERVE_CPU_ISA)"
    return CpuInfo(
        arch=arch,
        model=model,
        features=_features(arch, info, torch.cpu._is_amx_tile_supported()),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        cores=usable_cores(),
        l3_bytes=_l3_bytes(),
    )


# -------------------------------------------------------------------------------------- measurement


def cache_dir() -> Path:
    """DUOSERVE_CACHE_DIR, else $XDG_CACHE_HOME/duoserve, else ~/.cache/duoserve."""
    if os.environ.get("DUOSERVE_CACHE_DIR"):
        return Path(os.environ["DUOSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duoserve"


def host_tag(cpu: CpuInfo) -> str:
    """What a measurement depends on: the CPU's features and model, and torch's kernels."""
    key = f"{cpu.arch}|{cpu.model}|{sorted(cpu.features)}|{cpu.cores}|{torch.__version__}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _cache_path(cpu: CpuInfo) -> Path:
    return cache_dir() / f"host-{host_tag(cpu)}.json"


def _cached_date(cpu: CpuInfo) -> str | None:
    try:
        return json.loads(_cache_path(cpu).read_text())["date"]
    except (OSError, ValueError, KeyError):
        return None


def _best_seconds(fn: Callable[[], object], repeats: int = 2, budget: float = 0.03) -> float:
    """The fastest of a few calls after a warm-up: the machine's speed, not its neighbours' load. A call
    slower than `budget` is repeated once only: it is slow enough to lose whatever the noise."""
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    for _ in range(repeats if best < budget else 1):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_formats(cpu: CpuInfo) -> dict[tuple[str, int], float]:
    """Time F.linear in float32 and bfloat16 at 1 and PREFILL_ROWS rows, and the 4-bit codes both ways
    (torch's kernel, and tiles + GEMM) at DECODE_ROWS.

    Decode-sized steps read the weights once, so their matrix (about twice the L3 cache in bfloat16,
    4-64 M values) must come from memory as a model's would; prefill-sized dense ones are
    arithmetic-bound and use a 1 M-value slice of it, which keeps the slowest format (bf16 without
    hardware support) to a few tens of ms.
    """
    width = 2048
    out = max(2048, min(32768, cpu.l3_bytes // width))  # bf16 bytes = 2 x L3
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(256, width, generator=generator)
    weights = {"float32": block.repeat(out // 256, 1)}
    weights["bfloat16"] = weights["float32"].bfloat16()
    codes = torch.randint(0, 16, (out, width), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.full((width // 32, out, 2), 0.01, dtype=torch.bfloat16)
    many_rows = _int4_many_rows(packed, scales, out, width, weights["bfloat16"])
    int8 = (codes * 16 - 120).to(torch.int8)  # int8 codes of the same matrix size (Int8Linear's layout)
    row_scales = torch.full((out,), 0.01, dtype=torch.bfloat16)
    int8_tiles = _int8_many_rows(int8, row_scales)

    def matmul(fmt: str, x: torch.Tensor, rows_of_w: int) -> Callable[[], object]:
        if fmt == "q4":
            return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales)
        if fmt == "fused":
            return lambda: int4pack.fused_matmul(x, packed, scales)
        if fmt == "tiles":
            return lambda: many_rows(x)
        if fmt == "q8":
            return lambda: torch.ops.aten._weight_int8pack_mm(x, int8, row_scales)
        if fmt == "tiles8":
            return lambda: int8_tiles(x)
        if fmt == "fused8":
            return lambda: torch.ops.duoserve_cpu.int8_mm(x, int8, row_scales)
        w = weights[fmt][:rows_of_w]
        return lambda: torch.nn.functional.linear(x, w)

    timings: dict[tuple[str, int], float] = {}
    formats = ["float32", "bfloat16", "q4", "tiles"]
    if int4pack.fused_matmul_available():
        formats.append("fused")
    if int8_mm_available():  # the 8-bit paths are timed only where there is a choice to make
        formats += ["q8", "tiles8", "fused8"]
    with torch.inference_mode():
        for fmt in formats:
            dtype = _FP32 if fmt == "float32" else _BF16
            for rows in (1,) if fmt in ("float32", "bfloat16") else DECODE_ROWS:
                x = torch.randn(rows, width, generator=generator).to(dtype)
                timings[fmt, rows] = _best_seconds(matmul(fmt, x, out))
            if fmt in ("float32", "bfloat16"):
                x = torch.randn(PREFILL_ROWS, width, generator=generator).to(dtype)
                # Per row of the full matrix, so that it compares with the decode timings' matrix.
                timings[fmt, PREFILL_ROWS] = _best_seconds(matmul(fmt, x, 512)) * out / 512
        if prefill_attention_available():
            timings |= _time_prefill_attention(generator)
        if cpu_kernels_available():
            timings |= _time_float32_codes(generator)
    return timings


def _time_float32_codes(generator: torch.Generator) -> dict[tuple[str, int], float]:
    """float32 models' 4-bit linears both ways at FLOAT32_ROWS: duoserve's kernel on GGUF-layout codes
    ("f32codes", models/cpu_quant_linear.py) and float32 tiles + the float32 GEMM ("f32tiles", the path
    above its threshold). A 4096 x 2048 matrix (5 MB of codes): the two read the same codes, so which
    cache holds them matters less than the arithmetic, and 1,024 rows stay near 0.1 s a call where the
    kernels are vectorized (plain loops lose, and stop the timing, at fewer rows)."""
    out, width = 4096, 2048
    codes = torch.randint(0, 256, (out, width // 2), dtype=torch.uint8, generator=generator)
    scale_min = (torch.rand(out, 2, width // 32, generator=generator) * 0.02).half()
    ops = torch.ops.duoserve_cpu
    step = int4pack.tile_rows(width, 64)  # models/linear.py's tiles of a float32 model's codes
    tiles = _tiled(
        out,
        step,
        torch.empty(step, width),
        lambda start, end, part: ops.q4_dequantize(codes, scale_min, start, end, part),
        _store_columns,
    )

    timings = {}
    for rows in FLOAT32_ROWS:  # up to the first size the kernels lose at: the threshold stops there
        x = torch.randn(rows, width, generator=generator)
        timings["f32codes", rows] = _best_seconds(lambda x=x: ops.q4_matmul(x, codes, scale_min, 16))
        timings["f32tiles", rows] = _best_seconds(lambda x=x: tiles(x))
        if timings["f32codes", rows] >= timings["f32tiles", rows]:
            break
    return timings


def float32_codes_threshold(timings: Timings) -> int:
    """The most rows up to which float32 models' kernels beat float32 tiles + GEMM at every measured size
    (FLOAT32_ROWS); ALL_ROWS where they win at every one."""
    rows = 0
    for r in FLOAT32_ROWS:
        if timings["f32codes", r] >= timings["f32tiles", r]:
            return rows
        rows = r
    return ALL_ROWS


def _time_prefill_attention(generator: torch.Generator) -> dict[tuple[str, int], float]:
    """Causal attention of a PREFILL_QUERIES-token bfloat16 prompt (32 query heads over 8 KV heads of 64,
    Llama 3's layout), by duoserve's kernel and by SDPA: who runs prefill chunks (prefill_attention)."""
    q = torch.randn(PREFILL_QUERIES, 32, 64, generator=generator).to(_BF16)
    k, v = (torch.randn(PREFILL_QUERIES, 8, 64, generator=generator).to(_BF16) for _ in range(2))
    views = [t.transpose(0, 1)[None] for t in (q, k, v)]
    return {
        ("prefill_duoserve", PREFILL_QUERIES): _best_seconds(
            lambda: torch.ops.duoserve_cpu.prefill_attention(q, k, v, 0.125)
        ),
        ("prefill_sdpa", PREFILL_QUERIES): _best_seconds(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                *views, is_causal=True, scale=0.125, enable_gqa=True
            )
        ),
    }


def prefill_attention(rule: Rule, timings: Timings | None) -> str:
    """Who runs bfloat16 prefill chunks' attention: the faster where both were timed, the rule's prior
    otherwise."""
    key = ("prefill_duoserve", PREFILL_QUERIES)
    if timings is None or key not in timings:
        return rule.prefill_attention
    return "duoserve" if timings[key] < timings["prefill_sdpa", PREFILL_QUERIES] else "sdpa"


def _tiled(
    out: int,
    step: int,
    tile: torch.Tensor,
    fill: Callable[[int, int, torch.Tensor], None],
    store: Callable[[torch.Tensor, int, int, torch.Tensor], None],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ W.T by tiles of `step` output rows, as models/linear.py's many-row steps run: each tile filled
    by `fill(start, end, part)`, multiplied by the dense GEMM, its product stored by `store`."""

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], out, dtype=x.dtype)
        for start in range(0, out, step):
            end = min(start + step, out)
            part = tile[: end - start]
            fill(start, end, part)
            store(torch.nn.functional.linear(x, part), start, end, y)
        return y

    return run


def _store_columns(product: torch.Tensor, start: int, end: int, y: torch.Tensor) -> None:
    """A tile's product as output columns start:end (what models/linear.py's tiles store)."""
    y[:, start:end] = product


def _int8_many_rows(codes: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ (codes * scales).T as a bfloat16 model's 8-bit linear runs steps above its threshold
    (models/linear.py's Int8Linear): tiles of the codes as bfloat16, the dense GEMM, the row scales."""
    out, width = codes.shape
    step = int4pack.tile_rows(width, 64)
    return _tiled(
        out,
        step,
        torch.empty(step, width, dtype=_BF16),
        lambda start, end, part: part.copy_(codes[start:end]),
        lambda product, start, end, y: torch.mul(product, scales[start:end], out=y[:, start:end]),
    )


def _int4_many_rows(
    packed: torch.Tensor, scales: torch.Tensor, out: int, width: int, dense: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ W.T as a bfloat16 model's 4-bit linear runs steps above its threshold (models/linear.py):
    tiles of TILE_VALUES dequantized by int4pack, the dense GEMM on each. Where torch's int4 layout is
    not recognised linear.py cannot tile it (torch's kernel runs every step), and the alternative is the
    dense copy that a threshold of 0 loads: the dense GEMM is timed, as before tiles were."""
    if int4pack.BLOCK is None:
        return lambda x: torch.nn.functional.linear(x, dense)
    step = int4pack.tile_rows(width, int4pack.BLOCK)
    return _tiled(
        out,
        step,
        torch.empty(step, width, dtype=_BF16),
        lambda start, end, part: int4pack.dequantize_rows(packed, scales, start, end, part),
        _store_columns,
    )


def cached_measurement(cpu: CpuInfo, measure: Callable[[CpuInfo], Timings] = measure_formats) -> Timings:
    """`measure(cpu)`, from the disk cache when this CPU and torch were measured before."""
    path = _cache_path(cpu)
    try:
        record = json.loads(path.read_text())
        if record.get("version") == MEASUREMENT_VERSION:  # an older duoserve's timings: measure anew
            stored = record["timings"]
            return {(key.split("@")[0], int(key.split("@")[1])): float(t) for key, t in stored.items()}
    except (OSError, ValueError, KeyError, IndexError, AttributeError):
        pass
    logger.info("measuring this CPU's matmul formats once (cached in %s)", path)
    timings = measure(cpu)
    record = {
        "version": MEASUREMENT_VERSION,
        "date": datetime.date.today().isoformat(),
        "cpu": cpu.summary(),
        "torch": torch.__version__,
        "timings": {f"{fmt}@{rows}": t for (fmt, rows), t in timings.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError as error:  # a read-only home: measure again next time
        logger.warning("could not cache the CPU measurement in %s (%s)", path, error)
    return timings


@functools.cache
def host_defaults() -> HostDefaults:
    """This host's defaults (measured once per CPU and torch version where the table says so)."""
    measure = None if os.environ.get("DUOSERVE_HOST_MEASURE") == "0" else cached_measurement
    defaults = defaults_for(detect_cpu(), measure)
    if "amx_tile" in defaults.cpu.features and fused_capable(defaults.cpu):
        defaults = replace(defaults, fused_amx_rows=fused_amx_rows())
    prefill = os.environ.get("DUOSERVE_PREFILL_ATTENTION")
    if prefill:
        if prefill not in PREFILL_ATTENTION:
            choices = ", ".join(PREFILL_ATTENTION)
            raise ValueError(f"DUOSERVE_PREFILL_ATTENTION must be one of {choices}, got {prefill!r}")
        if prefill == "duoserve" and not prefill_attention_available():
            logger.warning("DUOSERVE_PREFILL_ATTENTION=duoserve: no kernel built on this CPU; using sdpa")
            prefill = "sdpa"
        defaults = replace(defaults, prefill_attention=prefill)
    return defaults
