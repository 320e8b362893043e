"""duoserve's C++ CPU kernels: one library, compiled for this host on first use and cached.

Nine sources, one library (`torch.ops.duoserve_cpu`): the paged decode attention
(`attention/csrc/paged_attention_cpu.cpp`), bfloat16 prefill chunks' causal attention on AVX512-BF16
hosts (`attention/csrc/prefill_attention_cpu.cpp`), the matmuls over 4/8-bit weight codes with float32
activations (`models/csrc/quantized_matmul_cpu.cpp`), the dequantization of torch's int4 layout for
bfloat16 models' many-row steps (`models/csrc/int4pack_dequantize_cpu.cpp`), bfloat16 activations times
that layout's codes and times int8 codes (`models/csrc/int4pack_mm_cpu.cpp`, `int8_mm_cpu.cpp`:
AVX512-BF16 hosts only, elsewhere the ops are there but refuse), a decode layer's small ops (RMSNorm,
RoPE, KV store: `models/csrc/decode_ops_cpu.cpp`), a decode step's whole stack of layers in one call
(`models/csrc/decode_layers_cpu.cpp`, which calls the others through `csrc/cpu_ops.h`) and the
structured outputs' token masks (`engine/csrc/token_bitmask_cpu.cpp`). They are compiled with torch's
C++ extension builder for the host CPU (`-march=native`), once per machine, torch version and source,
cached under ~/.cache/torch_extensions (about 40 s on 2 cores the first time). Where no compiler exists,
callers fall back to torch's own ops.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).parent
SOURCES = (
    _PACKAGE / "attention" / "csrc" / "paged_attention_cpu.cpp",
    _PACKAGE / "attention" / "csrc" / "prefill_attention_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "quantized_matmul_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "int4pack_dequantize_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "int4pack_mm_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "int8_mm_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "decode_ops_cpu.cpp",
    _PACKAGE / "models" / "csrc" / "decode_layers_cpu.cpp",
    _PACKAGE / "engine" / "csrc" / "token_bitmask_cpu.cpp",
)
# Included by the sources: part of what a build depends on.
HEADERS = (_PACKAGE / "csrc" / "cpu_ops.h", _PACKAGE / "csrc" / "cpu_vec.h", _PACKAGE / "csrc" / "cpu_amx.h")
# DUOSERVE_CPU_ISA runs this x86 host as a lesser one: the kernels are built for that level instead of
# -march=native, and duoserve.hardware sees only that level's features (so its table's row, the dtype and
# thresholds follow). A session on a Zen 5 or an AMX Xeon can then run, test and time the paths an
# AVX2-only CPU (a Zen 3) or a plain AVX-512 one takes. Torch's own kernels follow ATEN_CPU_CAPABILITY
# and oneDNN's ONEDNN_MAX_CPU_ISA: set them too (`benchmarks/cpu_table.py --as-isa` does).
# Level -> (its -march, the features of hardware.X86_FEATURES it has).
EMULATED_ISAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "avx512": ("x86-64-v4", ("avx512f", "avx2", "fma", "f16c")),
    "avx2": ("x86-64-v3", ("avx2", "fma", "f16c")),
    "generic": ("x86-64", ()),
}


def emulated_isa() -> str | None:
    """The level DUOSERVE_CPU_ISA asks this host to run as (None: the host's own)."""
    name = os.environ.get("DUOSERVE_CPU_ISA", "")
    if not name:
        return None
    if name not in EMULATED_ISAS:
        raise ValueError(f"DUOSERVE_CPU_ISA must be one of {', '.join(EMULATED_ISAS)}, got {name!r}")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ValueError(f"DUOSERVE_CPU_ISA={name} emulates an x86 level; this host is {platform.machine()}")
    return name


def _march() -> list[str]:
    isa = emulated_isa()
    return ["-march=native"] if isa is None else [f"-march={EMULATED_ISAS[isa][0]}", "-mtune=native"]


_OPS = (
    "paged_decode",
    "prefill_attention",
    "q4_matmul",
    "q8_matmul",
    "int4pack_dequantize",
    "int4pack_mm",
    "int4pack_mm_amx_rows",
    "int8_mm",
    "norm_rows",
    "rope_qk",
    "silu_mul",
    "store_kv",
    "store_kv_quantized",
    "decode_layers",
    "apply_token_bitmask",
)


def _build_tag() -> str:
    """What the built library depends on: -march=native code runs only on CPUs with the same features
    (and an emulated level's build is another library),
    the extension links against this torch, and its sources. The sources are in the name so that two
    versions of the kernels (two checkouts, an upgrade) never load each other's build from the shared
    cache: torch's builder only notices a changed source within one process. So is the package's
    directory: torch's build file records the sources' absolute paths, and two checkouts of the same
    sources sharing one build directory rebuilt it for each other on every start (minutes, each waiting
    on the other's lock, with several git worktrees on one machine)."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        )
    except OSError:
        flags = platform.processor()
    sources = hashlib.sha1(b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))).hexdigest()
    key = f"{flags}|{_march()}|{torch.__version__}|{sources}|{_PACKAGE}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja`; the pip package's binary may not be on PATH (e.g. under pyenv)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _loaded() -> bool:
    namespace = getattr(torch.ops, "duoserve_cpu", None)
    return namespace is not None and all(hasattr(namespace, op) for op in _OPS)


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (or load the cached build of) the C++ kernels; False, with a warning, where that fails."""
    if _loaded():
        return True
    _put_ninja_on_path()
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        logger.info("loading duoserve's CPU kernels (built once per machine: ~40 s the first time)")
        name = f"duoserve_cpu_{_build_tag()}"
        with exclusive_build(Path(_get_build_directory(name, verbose=False))):
            load(
                name=name,
                sources=[str(path) for path in SOURCES],
                # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. The library
                # links libgomp.so.1 by soname, so it shares the runtime torch has already loaded.
                extra_cflags=["-O3", *_march(), "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: fall back
        logger.warning("duoserve's CPU kernels are unavailable (%s); using torch's ops", error)
        return False
    return True


@functools.cache
def int8_mm_available() -> bool:
    """Whether the fused int8 kernel (bfloat16 x times int8 codes, models/csrc/int8_mm_cpu.cpp) was
    built for this CPU (AVX512-BF16): a bfloat16 model's 8-bit linears and the host measurement use it."""
    return cpu_kernels_available() and bool(torch.ops.duoserve_cpu.int8_mm_available())


@functools.cache
def fused_amx_rows() -> int:
    """Rows from which the fused 4-bit and 8-bit kernels multiply on AMX tiles (0: never): built for an
    AMX CPU (Sapphire Rapids and later) and granted the tiles by Linux. One threshold for both
    (csrc/cpu_amx.h); the 4-bit op reports it."""
    if not (cpu_kernels_available() and torch.ops.duoserve_cpu.int4pack_mm_available()):
        return 0
    return int(torch.ops.duoserve_cpu.int4pack_mm_amx_rows())


@functools.cache
def prefill_attention_available() -> bool:
    """Whether the prefill attention kernel (bfloat16 q/k/v, attention/csrc/prefill_attention_cpu.cpp) was
    built for this CPU (AVX512-BF16)."""
    return cpu_kernels_available() and bool(torch.ops.duoserve_cpu.prefill_attention_available())


@contextlib.contextmanager
def exclusive_build(directory: Path) -> Iterator[None]:
    """Hold the build directory for this process, clearing a lock file that a killed build left.

    torch's builder guards a build with a lock *file*: a build killed midway (a stopped server, a CI
    timeout) leaves it behind, and every later start then waits on it forever. An flock is released by
    the kernel when its holder dies, so under it no other duoserve process is building here, and a
    torch lock file found then is stale.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "duoserve.flock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            logger.warning("removing a stale kernel build lock (a build was killed): %s", stale)
            stale.unlink(missing_ok=True)
        yield
