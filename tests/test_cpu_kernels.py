"""The C++ kernel library's sources build for every x86 level we meet, not only for this host's."""

import shutil
import subprocess
import sysconfig

import pytest

from duoserve.cpu_kernels import SOURCES


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_source_compiles_for_every_x86_level(source, march) -> None:
    """Plain x86-64 takes the generic loops, v3 (AVX2, e.g. AMD Zen 3) and v4 (AVX-512) the fast paths."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{path}" for path in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    command = ["c++", "-std=c++17", "-fsyntax-only", f"-march={march}", "-fopenmp", *includes, str(source)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
