"""EngineConfig: validation, and the default dtype picked per device."""

from __future__ import annotations

import pytest
import torch

from duoserve import config as config_module
from duoserve.config import EngineConfig
from duoserve.hardware import CpuInfo, HostDefaults


def _host(dtype: torch.dtype, rows: int) -> HostDefaults:
    cpu = CpuInfo("x86_64", "test CPU", frozenset(), "DEFAULT", 2)
    return HostDefaults(cpu, dtype, rows, 2, "generic", "test", float32_quantized_max_rows=rows + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_defaults_are_the_hosts(monkeypatch, dtype):
    monkeypatch.setattr(config_module, "host_defaults", lambda: _host(dtype, 4))
    config = EngineConfig(device="cpu")
    assert config.resolved_dtype() == dtype
    assert config.resolved_kv_dtype() == config.resolved_dtype()
    # Each dtype has its own threshold: torch's kernels in bfloat16, duoserve's in float32.
    assert config.resolved_quantized_max_rows() == (4 if dtype == torch.bfloat16 else 5)
    assert EngineConfig(device="cpu", quantized_max_rows=0).resolved_quantized_max_rows() == 0


def test_explicit_dtype_wins():
    assert EngineConfig(device="cpu", dtype="float32").resolved_dtype() == torch.float32


BAD = [("quantization", "int3"), ("dtype", "float8"), ("block_size", 0), ("quantized_max_rows", -1)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
