"""EngineConfig: validation, and the default dtype picked per device."""

from __future__ import annotations

import pytest
import torch

from duoserve.config import EngineConfig


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_default_dtype_follows_amx(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    config = EngineConfig(device="cpu")
    assert config.resolved_dtype() == (torch.bfloat16 if amx else torch.float32)
    assert config.resolved_kv_dtype() == config.resolved_dtype()


def test_explicit_dtype_wins():
    assert EngineConfig(device="cpu", dtype="float32").resolved_dtype() == torch.float32


BAD = [("quantization", "int3"), ("dtype", "float8"), ("block_size", 0)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
