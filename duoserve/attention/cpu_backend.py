"""The CPU backend: decodes read K/V from the paged pool in place, in a C++ kernel built on first use.

At 256 decoding sequences the torch backend spends most of a step gathering every sequence's blocks
into a padded buffer, layer after layer, before SDPA reads them a second time (BENCHMARKS.md). The
kernel (`csrc/paged_attention_cpu.cpp`) walks each sequence's block table instead and reads every K/V
row once. It is compiled with torch's C++ extension builder for the host CPU (`-march=native`), once
per machine and torch version, cached under ~/.cache/torch_extensions (about 20 s on 2 cores). Prefill
chunks stay on the torch path: they are compute-bound, and SDPA's flash kernel does them well.
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

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"


def _build_tag() -> str:
    """What the built library depends on: -march=native code runs only on CPUs with the same features,
    the extension links against this torch, and its source. The source is in the name so that two
    versions of the kernel (two checkouts, an upgrade) never load each other's build from the shared
    cache: torch's builder only notices a changed source within one process."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        )
    except OSError:
        flags = platform.processor()
    source = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()
    return hashlib.sha1(f"{flags}|{torch.__version__}|{source}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja`; the pip package's binary may not be on PATH (e.g. under pyenv)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (or load the cached build of) the C++ kernels; False, with a warning, where that fails."""
    if hasattr(torch.ops, "duoserve_cpu") and hasattr(torch.ops.duoserve_cpu, "paged_decode"):
        return True
    _put_ninja_on_path()
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        logger.info("loading the CPU attention kernel (built once per machine: ~20 s the first time)")
        name = f"duoserve_cpu_{_build_tag()}"
        with exclusive_build(Path(_get_build_directory(name, verbose=False))):
            load(
                name=name,
                sources=[str(_SOURCE)],
                # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. The library
                # links libgomp.so.1 by soname, so it shares the runtime torch has already loaded.
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: fall back
        logger.warning("the CPU attention kernel is unavailable (%s); using the torch backend", error)
        return False
    return True


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


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """q [num_seqs, heads, dim] attending to each sequence's first context_lens[i] pooled tokens, or only
    to its last `sliding_window` of them (the table entries before those are never read)."""
    return torch.ops.duoserve_cpu.paged_decode(
        q.contiguous(),
        k_pool,
        v_pool,
        block_tables.contiguous(),
        context_lens.contiguous(),
        scale,
        sliding_window or 0,
        logits_soft_cap or 0.0,
    )


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with its decodes in the kernel (which needs no padded groups)."""

    def _decode_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
    ) -> None:
        num = meta.num_decode_tokens
        out[:num] = paged_decode(
            q[:num],
            k_pool,
            v_pool,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            sliding_window,
            logits_soft_cap,
        )
