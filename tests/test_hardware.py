"""Host capabilities -> defaults, as a table; the measurement injected, so no outcome depends on it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from duoserve import hardware, int4pack
from duoserve.cpu_kernels import cpu_kernels_available, int8_mm_available, prefill_attention_available
from duoserve.hardware import (
    ALL_ROWS,
    DECODE_ROWS,
    FLOAT32_ROWS,
    INT8_ACTIVATIONS,
    PREFILL_QUERIES,
    PREFILL_ROWS,
    PRIOR_FLOAT32_QUANTIZED_MAX_ROWS,
    PRIOR_INT4_FUSED_ROWS,
    PRIOR_INT8_FUSED_ROWS,
    PRIOR_QUANTIZED_MAX_ROWS,
    RULES,
    CpuInfo,
    cached_measurement,
    cgroup_cpu_limit,
    cgroup_memory_available,
    decide,
    defaults_for,
    detect_cpu,
    float32_codes_threshold,
    fused_rows,
    measure_formats,
    passes_int8_gate,
)

BF16, FP32 = torch.bfloat16, torch.float32

# Real CPUs' feature sets (of those the table reads), from their /proc/cpuinfo.
THIS_ZEN1 = ("x86_64", {"avx2", "fma", "f16c"})  # the AMD EPYC (family 23 model 1) these tests ran on
SAPPHIRE_RAPIDS = ("x86_64", {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma", "f16c"})
ZEN5 = ("x86_64", {"avx512_bf16", "avx512f", "avx512vbmi", "avx2", "fma", "f16c"})
COOPER_LAKE = ("x86_64", {"avx512_bf16", "avx512f", "avx2", "fma", "f16c"})  # BF16 without VBMI
SKYLAKE_X = ("x86_64", {"avx512f", "avx2", "fma", "f16c"})
GRAVITON3 = ("aarch64", {"asimd", "bf16", "sve", "i8mm"})
GRAVITON2 = ("aarch64", {"asimd"})
SANDY_BRIDGE = ("x86_64", set())  # AVX without AVX2: nothing the table reads
RISCV = ("riscv64", set())


def cpu(arch: str, features: set[str], cores: int = 2) -> CpuInfo:
    return CpuInfo(arch, "test CPU", frozenset(features), "DEFAULT", cores, l3_bytes=1 << 20)


# capability set -> (table row, default dtype, attention kernel), with the priors (no measurement).
TABLE = [
    (SAPPHIRE_RAPIDS, "amx", BF16, "avx512_bf16"),
    (ZEN5, "avx512_bf16", BF16, "avx512_bf16"),
    (SKYLAKE_X, "avx512", FP32, "avx512"),
    (THIS_ZEN1, "avx2", FP32, "avx2"),
    (GRAVITON3, "neon_bf16", FP32, "neon"),
    (GRAVITON2, "neon", FP32, "neon"),
    (SANDY_BRIDGE, "generic", FP32, "generic"),
    (RISCV, "generic", FP32, "generic"),
]


@pytest.mark.parametrize(("caps", "level", "dtype", "isa"), TABLE)
def test_priors_follow_the_table(caps, level, dtype, isa):
    host = defaults_for(cpu(*caps, cores=3), measure=None)
    assert cpu(*caps).level == level
    assert (host.dtype, host.attention_isa, host.num_threads) == (dtype, isa, 3)
    assert host.quantized_max_rows == PRIOR_QUANTIZED_MAX_ROWS and host.measured_on is None


@pytest.mark.parametrize(("caps", "level", "dtype", "isa"), TABLE)
def test_float32_activations_follow_the_table(caps, level, dtype, isa, monkeypatch):
    """int8 activations only on the rows listed as measured faster and passing the accuracy gate."""
    assert defaults_for(cpu(*caps), measure=None).quantized_activations == (
        "int8" if level in INT8_ACTIVATIONS else "int16"
    )
    monkeypatch.setitem(INT8_ACTIVATIONS, "avx2", "measured")
    host = defaults_for(cpu(*caps), measure=None)
    assert host.quantized_activations == ("int8" if level == "avx2" else "int16")


@pytest.mark.parametrize(
    ("figures", "passes"),
    [
        ((6.4e-8, 3.0e-7, 1.0, True), True),  # int16 on SmolLM2 (benchmarks/activation_rounding.py)
        ((3.0e-3, 1.1e-2, 0.980, False), False),  # int8 per group of 32: every criterion fails
        ((6.4e-4, 2.4e-3, 0.988, True), False),  # int8 on the lm_head only: argmaxes moved
        ((2.4e-4, 2.0e-3, 1.0, False), False),  # the same argmaxes but another greedy text
        ((1.1e-3, 2.0e-3, 1.0, True), False),  # mean divergence past 1e-3
        ((5e-4, 1.1e-2, 1.0, True), False),  # p99 divergence past 1e-2
    ],
)
def test_int8_gate_asks_for_the_same_argmaxes_and_greedy_tokens(figures, passes):
    assert passes_int8_gate(*figures) is passes


@pytest.mark.parametrize(
    ("caps", "level"), [(caps, level) for caps, level, *_ in TABLE] + [(COOPER_LAKE, "avx512_bf16")]
)
def test_prefill_attention_follows_the_table(caps, level):
    """duoserve's prefill kernel where AVX512-BF16 exists without AMX (Zen 4/5, Cooper Lake), SDPA's
    elsewhere (AMX: its kernel uses AMX tiles; without BF16 the kernel is not built)."""
    assert cpu(*caps).level == level
    expected = "duoserve" if level == "avx512_bf16" else "sdpa"
    assert defaults_for(cpu(*caps), measure=None).prefill_attention == expected


@pytest.mark.parametrize(
    ("level", "ours", "sdpa", "expected"),
    [
        ("amx", 1.0, 2.0, "duoserve"),
        ("amx", 2.0, 1.0, "sdpa"),
        ("avx512_bf16", 2.0, 1.0, "sdpa"),
        ("avx512_bf16", 1.0, 2.0, "duoserve"),
    ],
)
def test_prefill_attention_is_measured_where_the_kernel_builds(level, ours, sdpa, expected):
    """Timed both ways, the faster runs prefill chunks, whatever the row's prior (AMX's is SDPA's)."""
    timings = {("prefill_duoserve", PREFILL_QUERIES): ours, ("prefill_sdpa", PREFILL_QUERIES): sdpa}
    assert hardware.prefill_attention(RULES[level], timings) == expected
    assert hardware.prefill_attention(RULES[level], {}) == RULES[level].prefill_attention


def test_prefill_attention_can_be_overridden(monkeypatch):
    monkeypatch.setenv("DUOSERVE_HOST_MEASURE", "0")
    try:
        for choice in ("sdpa", "duoserve"):
            monkeypatch.setenv("DUOSERVE_PREFILL_ATTENTION", choice)
            hardware.host_defaults.cache_clear()
            # duoserve's where the kernel is built (AVX512-BF16); elsewhere a warning, and SDPA
            expected = choice if prefill_attention_available() else "sdpa"
            assert hardware.host_defaults().prefill_attention == expected
            assert f"prefill attention {expected}" in hardware.host_defaults().describe()
        monkeypatch.setenv("DUOSERVE_PREFILL_ATTENTION", "flash")
        hardware.host_defaults.cache_clear()
        with pytest.raises(ValueError, match="must be one of duoserve, sdpa"):
            hardware.host_defaults()
    finally:
        hardware.host_defaults.cache_clear()


def test_amx_needs_the_tile_flag_too():
    assert cpu("x86_64", SAPPHIRE_RAPIDS[1] - {"amx_tile"}).level == "avx512_bf16"


def timings(fp32: tuple, bf16: tuple, q4: tuple, tiles: tuple | None = None) -> dict:
    """fp32, bf16 (dense): (1 row, 64 rows); q4 (torch's 4-bit kernel), tiles (dequantized tiles + the
    dense GEMM): at 1, 4, 8, 16, 32, 64 rows (tiles: by default the time of 64 rows, whatever the rows)."""
    out = {("float32", 1): fp32[0], ("float32", PREFILL_ROWS): fp32[1]}
    out["bfloat16", 1], out["bfloat16", PREFILL_ROWS] = bf16
    tiles = tiles or (bf16[1],) * len(DECODE_ROWS)
    for i, rows in enumerate(DECODE_ROWS):
        out["q4", rows], out["tiles", rows] = q4[i], tiles[i]
    return out


# Issue 10's Zen 5 (ms per 2048 x 16384 matrix, benchmarks/int4_tiles.py): the 4-bit kernel beats the
# tiles up to 16 rows, ties at 32.
ZEN5_LIKE = timings(
    (33.9, 40), (4.0, 12.2), (1.0, 1.7, 3.6, 7.0, 13.7, 28.3), (13.4, 13, 10.2, 11.5, 13.3, 17.8)
)

# timings -> (dtype, row threshold) where the table leaves the dtype open.
DECISIONS = [
    (ZEN5_LIKE, BF16, 16),
    # bf16 in software: faster than fp32 at 1 row with the codes, 6x slower at prefill -> fp32; the
    # codes beat the tiles (a slow GEMM) at every size.
    (timings((20, 100), (25, 600), (10, 11, 12, 13, 14, 15)), FP32, 64),
    # bf16 as fast as fp32 dense, the codes beat the tiles at 1 row only -> bf16, codes for 1 row.
    (timings((10, 100), (10, 100), (5, 11, 12, 13, 14, 15), (10,) * 6), BF16, 1),
    # the codes never faster than the tiles: threshold 0.
    (timings((10, 100), (5, 50), (6, 6, 6, 6, 6, 6), (5,) * 6), BF16, 0),
    # a noisy loss at 4 rows ends the range, whatever 8 and more say.
    (timings((10, 100), (10, 50), (4, 20, 5, 6, 7, 8), (10,) * 6), BF16, 1),
    # the codes lose from 32 rows on (torch's kernel grows with the rows, the tiles barely).
    (timings((10, 100), (10, 50), (1, 2, 4, 8, 16, 32), (12, 12, 12, 12, 14, 16)), BF16, 16),
]


@pytest.mark.parametrize(("measured", "dtype", "rows"), DECISIONS)
@pytest.mark.parametrize("level", ["avx512_bf16", "avx512", "neon_bf16"])
def test_measurement_decides_where_the_table_leaves_it_open(measured, dtype, rows, level):
    chosen, max_rows, reason = decide(RULES[level], measured)
    assert (chosen, max_rows) == (dtype, rows)
    assert ("bf16" if dtype == BF16 else "fp32") + " " in reason


def test_measurement_does_not_overrule_a_settled_dtype():
    slow_bf16 = timings((1, 10), (50, 90), (60,) * 6, (50,) * 6)
    assert decide(RULES["amx"], slow_bf16)[:2] == (BF16, 0)  # AMX: bf16, but the codes lose here
    assert decide(RULES["avx2"], ZEN5_LIKE)[:2] == (FP32, 16)  # the threshold serves --dtype bfloat16


def test_the_threshold_compares_the_codes_with_the_tiles_not_a_dense_matrix():
    """Above the threshold the engine dequantizes tiles (no dense copy): a dense GEMM on a ready matrix
    faster than the codes must not lower the threshold."""
    measured = dict(ZEN5_LIKE)
    measured["bfloat16", 1] = 0.5  # dense faster than the codes even at 1 row
    assert decide(RULES["avx512_bf16"], measured)[1] == 16


@pytest.mark.parametrize("caps", [SAPPHIRE_RAPIDS, ZEN5, SKYLAKE_X, THIS_ZEN1])
def test_every_cpu_kind_is_measured_where_measuring_is_allowed(caps):
    """Each row leaves a threshold open: bfloat16's (for `--dtype bfloat16`) and the float32 kernels'."""
    calls = []

    def measure(info):
        calls.append(info)
        return ZEN5_LIKE

    host = defaults_for(cpu(*caps), measure)
    assert len(calls) == 1 and host.measured_on is not None and host.timings
    assert defaults_for(cpu(*caps), None).measured_on is None and len(calls) == 1


def f32_timings(codes: tuple[float, ...], tiles: tuple[float, ...]) -> dict[tuple[str, int], float]:
    return {("f32codes", r): c for r, c in zip(FLOAT32_ROWS, codes, strict=True)} | {
        ("f32tiles", r): t for r, t in zip(FLOAT32_ROWS, tiles, strict=True)
    }


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((1, 2, 3, 4, 6, 10, 30, 90), ALL_ROWS),  # wins at every size: every step, however many rows
        ((1, 2, 3, 4, 6, 20, 30, 90), 32),  # loses at 64 rows: tiles from there, even where it wins again
        ((1, 2, 3, 4, 6, 10, 30, 100), 256),  # a tie at 1,024 is not a win
        ((9, 2, 3, 4, 6, 10, 30, 90), 0),  # loses at 1 row: never
    ],
)
def test_float32_threshold_is_the_kernels_winning_run(codes, expected):
    tiles = (2, 3, 4, 5, 7, 12, 40, 100)
    measured = ZEN5_LIKE | f32_timings(codes, tiles)
    host = defaults_for(cpu(*THIS_ZEN1), lambda info: measured)
    assert host.float32_quantized_max_rows == expected == float32_codes_threshold(measured)
    upto = "at every row count" if expected == ALL_ROWS else f"up to {expected} rows"
    assert f"4/8-bit codes {upto} (duoserve's float32 kernels" in host.describe()


def test_float32_threshold_keeps_its_prior_where_the_kernels_were_not_timed():
    host = defaults_for(cpu(*THIS_ZEN1), lambda info: ZEN5_LIKE)
    assert host.float32_quantized_max_rows == PRIOR_FLOAT32_QUANTIZED_MAX_ROWS


def test_this_machines_capabilities_describe_line():
    host = defaults_for(CpuInfo("x86_64", "AMD EPYC", frozenset(THIS_ZEN1[1]), "AVX2", 2), measure=None)
    assert host.describe() == (
        "host: AMD EPYC (x86_64: avx2,fma,f16c; no avx512/amx), 2 threads -> dtype float32, "
        "4/8-bit codes up to 32 rows (duoserve's float32 kernels, int16 activations), attention kernel avx2, "
        f"prefill attention sdpa ({RULES['avx2'].reason})"
    )


def test_describe_says_what_was_measured():
    host = defaults_for(cpu(*ZEN5), lambda info: ZEN5_LIKE)
    line = host.describe()
    assert "dtype bfloat16, 4/8-bit decode kernels up to 16 rows, attention kernel avx512_bf16" in line
    assert "(measured 20" in line and "bf16 " in line


CPUINFO = [
    ({"flags": "fpu sse avx f16c fma avx2 bmi2 sha_ni"}, "x86_64", True, {"avx2", "fma", "f16c"}),
    (
        {"flags": "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"},
        "x86_64",
        False,
        {"avx2", "fma", "avx512f", "avx512_bf16"},
    ),
    ({"Features": "fp asimd evtstrm aes sve bf16 i8mm"}, "aarch64", False, {"asimd", "sve", "bf16", "i8mm"}),
]


@pytest.mark.parametrize(("fields", "arch", "amx_permitted", "expected"), CPUINFO)
def test_features_from_proc_cpuinfo(fields, arch, amx_permitted, expected, monkeypatch):
    monkeypatch.delenv("DUOSERVE_CPU_ISA", raising=False)  # the host's own features
    assert hardware._features(arch, fields, amx_permitted) == frozenset(expected)


ZEN5_FLAGS = {"flags": "fpu sse2 avx2 fma f16c avx512f avx512bw avx512vbmi avx512_bf16"}


@pytest.mark.parametrize(
    ("isa", "level", "march"),
    [("avx2", "avx2", "x86-64-v3"), ("avx512", "avx512", "x86-64-v4"), ("generic", "generic", "x86-64")],
)
def test_a_host_runs_as_a_lesser_x86_level(isa, level, march, monkeypatch):
    """DUOSERVE_CPU_ISA: the table sees that level's features only, and the C++ kernels are another
    build, for that level (so a Zen 5 runs the paths of a Zen 3)."""
    from duoserve import cpu_kernels

    monkeypatch.delenv("DUOSERVE_CPU_ISA", raising=False)  # the native tag, even in a run at another level
    native_tag = cpu_kernels._build_tag()
    monkeypatch.setenv("DUOSERVE_CPU_ISA", isa)
    features = hardware._features("x86_64", ZEN5_FLAGS, amx_permitted=False)
    cpu = CpuInfo("x86_64", "AMD EPYC", features, "AVX2", 2)
    assert cpu.level == level
    assert cpu_kernels._march()[0] == f"-march={march}"
    assert cpu_kernels._build_tag() != native_tag


def test_an_unknown_emulated_level_is_refused(monkeypatch):
    from duoserve import cpu_kernels

    monkeypatch.setenv("DUOSERVE_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="DUOSERVE_CPU_ISA must be one of avx512, avx2, generic"):
        cpu_kernels.emulated_isa()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_measurement_is_cached_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOSERVE_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(info):
        calls.append(info)
        return ZEN5_LIKE

    first = cached_measurement(cpu(*ZEN5), measure)
    assert cached_measurement(cpu(*ZEN5), measure) == first and len(calls) == 1
    (stored,) = tmp_path.glob("host-*.json")
    assert json.loads(stored.read_text())["timings"]["q4@1"] == 1.0
    cached_measurement(cpu(*SKYLAKE_X), measure)  # another CPU: measured anew
    assert len(calls) == 2


@pytest.mark.parametrize(
    "record",
    [
        # An older duoserve's cache: no version, the dense-GEMM keys, no tiles.
        {"date": "2026-01-01", "timings": {"q4@1": 1.0, "bfloat16@1": 4.0, "bfloat16@16": 5.0}},
        {"version": hardware.MEASUREMENT_VERSION - 1, "date": "2026-01-01", "timings": {"q4@1": 1.0}},
        ["not", "a", "record"],
    ],
)
def test_a_stale_cached_measurement_is_measured_again(tmp_path, monkeypatch, record):
    monkeypatch.setenv("DUOSERVE_CACHE_DIR", str(tmp_path))
    info = cpu(*ZEN5)
    hardware._cache_path(info).write_text(json.dumps(record))
    calls = []

    def measure(cpu_info):
        calls.append(cpu_info)
        return ZEN5_LIKE

    assert cached_measurement(info, measure) == ZEN5_LIKE and len(calls) == 1
    stored = json.loads(hardware._cache_path(info).read_text())
    assert stored["version"] == hardware.MEASUREMENT_VERSION and "tiles@64" in stored["timings"]
    assert cached_measurement(info, measure) == ZEN5_LIKE and len(calls) == 1  # the new one is kept
    assert decide(RULES["avx512_bf16"], cached_measurement(info, measure))[1] == 16


def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("DUOSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.cache_dir() == tmp_path / "duoserve"


def test_this_host_is_detected():
    info = detect_cpu()
    assert info.level in RULES and info.cores >= 1 and info.l3_bytes > 0
    assert info.torch_capability == torch.backends.cpu.get_cpu_capability()


def test_measurement_times_every_format_and_size(single_torch_thread):
    """Runs the real measurement on a small matrix; only its shape is checked, never its outcome."""
    measured = measure_formats(cpu(*THIS_ZEN1))
    expected = {(fmt, rows) for fmt in ("float32", "bfloat16") for rows in (1, PREFILL_ROWS)}
    codes = ["q4", "tiles"] + (["fused"] if int4pack.fused_matmul_available() else [])
    codes += ["q8", "tiles8", "fused8"] if int8_mm_available() else []
    expected |= {(fmt, rows) for fmt in codes for rows in DECODE_ROWS}
    if prefill_attention_available():
        expected |= {("prefill_duoserve", PREFILL_QUERIES), ("prefill_sdpa", PREFILL_QUERIES)}
    if cpu_kernels_available():  # up to the first size the float32 kernels lose at
        timed = [r for r in FLOAT32_ROWS if ("f32codes", r) in measured]
        assert timed == list(FLOAT32_ROWS[: len(timed)]) and timed
        lost = [r for r in timed if measured["f32codes", r] >= measured["f32tiles", r]]
        assert lost in ([], [timed[-1]]) and (lost or timed == list(FLOAT32_ROWS))
        expected |= {(fmt, rows) for fmt in ("f32codes", "f32tiles") for rows in timed}
    assert set(measured) == expected and all(t > 0 for t in measured.values())
    decide(RULES["avx512_bf16"], measured)  # whatever it says, the decision accepts it


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "max\n", "memory.current": "1000\n"}, None),
        ({"memory.max": "8589934592\n", "memory.current": "1073741824\n"}, 7 << 30),
        ({"memory.max": "1000\n", "memory.current": "5000\n"}, 0),
        ({"memory/memory.limit_in_bytes": "4294967296\n", "memory/memory.usage_in_bytes": "0\n"}, 4 << 30),
        ({"memory/memory.limit_in_bytes": f"{(1 << 63) - 4096}", "memory/memory.usage_in_bytes": "1"}, None),
        ({}, None),
    ],
)
def test_cgroup_memory(tmp_path, files, expected):
    """A pod's memory limit bounds the KV cache's default size (/proc/meminfo shows the node's)."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_memory_available(tmp_path) == expected


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (ZEN5, PRIOR_INT4_FUSED_ROWS),
        (("x86_64", SAPPHIRE_RAPIDS[1] | {"avx512vbmi"}), PRIOR_INT4_FUSED_ROWS),
        (SAPPHIRE_RAPIDS, (0, 0)),  # as listed above, without VBMI
        (COOPER_LAKE, (0, 0)),
        (SKYLAKE_X, (0, 0)),
        (THIS_ZEN1, (0, 0)),
        (GRAVITON3, (0, 0)),
    ],
)
def test_fused_kernel_prior_needs_bf16_and_vbmi(caps, expected):
    """The 4-bit kernel is compiled for AVX512-BF16 with VBMI's byte shuffles, the 8-bit one for
    AVX512-BF16; elsewhere they never run."""
    host = defaults_for(cpu(*caps), measure=None)
    assert host.int4_fused_rows == expected
    assert host.int8_fused_rows == (PRIOR_INT8_FUSED_ROWS if "avx512_bf16" in caps[1] else (0, 0))


def with_fused(measured: dict, fused: tuple) -> dict:
    out = dict(measured)
    out.update({("fused", rows): t for rows, t in zip(DECODE_ROWS, fused, strict=True)})
    return out


# (fused timings at 1, 4, 8, 16, 32, 64 rows against ZEN5_LIKE, where torch's kernel beats the tiles up
# to 16 rows) -> (fused range, threshold of the codes, either kernel)
FUSED = [
    ((2, 2, 2, 3, 5, 9), (8, 64), 64),  # beats torch's kernel from 8 rows, the tiles from 32: 8-64
    ((0.5, 1, 2, 3, 5, 9), (1, 64), 64),  # wins everywhere
    ((2, 2, 5, 8, 5, 9), (32, 64), 64),  # loses to torch's kernel at 8-16: 32-64 only
    ((2, 1, 2, 8, 5, 9), (32, 64), 64),  # a loss at 16 ends the run that reaches 64
    ((2, 1, 3.7, 3, 5, 9), (4, 64), 64),  # 3.7 against 3.6 at 8: a tie inside the run keeps it going
    ((2, 1, 3.9, 3, 5, 9), (16, 64), 64),  # 3.9 against 3.6: beyond FUSED_TIE, a loss
    ((2, 2, 2, 3, 5, 20), (8, 32), 32),  # loses to the tiles at 64
    ((9, 9, 9, 9, 20, 20), (0, 0), 16),  # never: the threshold is torch's kernel's
]


@pytest.mark.parametrize(("fused", "expected", "threshold"), FUSED)
def test_fused_range_is_measured(fused, expected, threshold):
    measured = with_fused(ZEN5_LIKE, fused)
    assert decide(RULES["avx512_bf16"], measured)[1] == threshold
    assert fused_rows(measured, threshold) == expected
    host = defaults_for(cpu(*ZEN5), lambda info: measured)
    assert host.int4_fused_rows == expected and host.quantized_max_rows == threshold


def test_a_fused_kernel_keeps_the_codes_where_torchs_never_wins():
    """An engine whose threshold is 0 loads dense weights: where only the fused kernel beats the tiles,
    the threshold must still let it run."""
    measured = with_fused(timings((10, 100), (5, 50), (6,) * 6, (5,) * 6), (1, 1, 2, 3, 4, 9))
    host = defaults_for(cpu(*ZEN5), lambda info: measured)
    assert (host.quantized_max_rows, host.int4_fused_rows) == (32, (1, 32))


def test_no_fused_timings_no_fused_range():
    """A host where the kernels did not build times no `fused`: never, whatever its capabilities."""
    host = defaults_for(cpu(*ZEN5), lambda info: ZEN5_LIKE)
    assert host.int4_fused_rows == host.int8_fused_rows == (0, 0)


def test_8bit_range_compares_the_8bit_paths():
    """The 8-bit kernel's range comes from the 8-bit timings: torch's int8 kernel up to the (4-bit)
    threshold, the int8 tiles above."""
    measured = dict(ZEN5_LIKE)
    for rows, q8, tiles8, fused8 in zip(
        DECODE_ROWS, (1, 2, 4, 8, 16, 32), (20,) * 6, (2, 1.5, 3, 6, 15, 25), strict=True
    ):
        measured["q8", rows], measured["tiles8", rows], measured["fused8", rows] = q8, tiles8, fused8
    host = defaults_for(cpu(*ZEN5), lambda info: measured)
    assert (host.quantized_max_rows, host.int8_fused_rows, host.int4_fused_rows) == (16, (4, 32), (0, 0))
    assert host.int8_max_rows == 32  # its own threshold, capped by the 4-bit one where linears are built
    assert "fused 8-bit kernel at 4-32 rows" in host.describe()
    measured["tiles8", 16] = 5  # the 8-bit codes lose to their tiles from 16 rows on
    host = defaults_for(cpu(*ZEN5), lambda info: measured)
    assert host.int8_max_rows == 8 and "up to 16 rows (8-bit: 8)" in host.describe()


def test_describe_says_the_fused_range():
    host = defaults_for(cpu(*ZEN5), lambda info: with_fused(ZEN5_LIKE, FUSED[0][0]))
    assert "4/8-bit decode kernels up to 64 rows, fused 4-bit kernel at 8-64 rows" in host.describe()
    assert "AMX" not in host.describe()
    amx = replace(host, fused_amx_rows=3)
    assert "fused 4-bit kernel at 8-64 rows (on AMX tiles from 3 rows)" in amx.describe()
    assert "AMX" not in replace(amx, int4_fused_rows=(0, 0)).describe()  # no fused kernel runs


def test_this_hosts_fused_kernels_use_amx_where_it_has_it():
    """The kernels multiply on AMX tiles exactly where the CPU (and Linux) offer them, and say so."""
    host = hardware.host_defaults()
    has_amx = "amx_tile" in host.cpu.features and hardware.fused_capable(host.cpu)
    assert (host.fused_amx_rows > 0) == (has_amx and int4pack.fused_matmul_available())
