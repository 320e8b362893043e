"""The C++ kernel library's sources build for every x86 level we meet, not only for this host's."""

import os
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from duoserve.cpu_kernels import SOURCES

LEVELS = ["x86-64", "x86-64-v3", "x86-64-v4"]
# The torch headers every source includes: parsing them is most of a check (5.5 s of 6 on a 2-core VM),
# so each level parses them once, into a precompiled header, and its checks use it (1.1 s each).
_PCH_HEADERS = ("ATen/ATen.h", "ATen/Parallel.h", "torch/library.h")


def _flags(level: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{path}" for path in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return ["c++", "-std=c++17", f"-march={level}", "-fopenmp", *includes]


def _check(source: Path, level: str, pch_dir: Path) -> subprocess.CompletedProcess:
    pch = pch_dir / level / "pch.h"
    command = [*_flags(level), "-fsyntax-only", "-include", str(pch), str(source)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _precompile(level: str, pch_dir: Path) -> None:
    """The torch headers as a precompiled header for this level (GCC uses pch.h.gch beside pch.h when the
    flags match; where it cannot, it parses pch.h itself: slower, the same check)."""
    directory = pch_dir / level
    directory.mkdir(parents=True)
    header = directory / "pch.h"
    header.write_text("".join(f"#include <{name}>\n" for name in _PCH_HEADERS))
    command = [*_flags(level), "-w", "-x", "c++-header", str(header), "-o", f"{header}.gch"]
    subprocess.run(command, capture_output=True, check=False)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every (source, level) checked once, all at a time over the cores (each a single-threaded compiler).
    The precompiled headers (0.4 GB a level) are deleted once checked, not kept with pytest's tmp dirs."""
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        pch_dir = Path(directory)
        list(pool.map(lambda level: _precompile(level, pch_dir), LEVELS))
        jobs = {(s.name, level): pool.submit(_check, s, level, pch_dir) for s in SOURCES for level in LEVELS}
        return {key: job.result() for key, job in jobs.items()}


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("march", LEVELS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_source_compiles_for_every_x86_level(source, march, compiled) -> None:
    """Plain x86-64 takes the generic loops, v3 (AVX2, e.g. AMD Zen 3) and v4 (AVX-512) the fast paths."""
    result = compiled[(source.name, march)]
    assert result.returncode == 0, result.stderr[-2000:]
