"""Process-wide settings that the engine needs from the platform."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed buffers to the kernel after every op.

    By default each tensor over 128 KiB is a fresh mmap, unmapped when freed, so every op of every
    step page-faults its output in again: on this 2-core VM that took over half of a prefill step
    (BENCHMARKS.md). Serving the same sizes step after step from the heap removes that.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return
    try:
        libc = ctypes.CDLL(path)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc
        ok = False
    if not ok:
        logger.debug("mallopt unavailable: large CPU buffers stay mmap-backed")


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel once (malloc_trim), e.g. after loading a model.

    keep_freed_memory keeps every freed buffer for reuse, so the transient copies made while building
    the model's layers would otherwise stay resident for good: 150 MiB (0.25x the file) for a 1B Q4_K
    GGUF (benchmarks/memory.py). Later steps allocate from the heap again and keep what they use.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return
    try:
        ctypes.CDLL(path).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        logger.debug("malloc_trim unavailable: memory freed while loading stays in the heap")
