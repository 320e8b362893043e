"""EngineConfig: validation, and the default dtype picked per device."""

from __future__ import annotations

from dataclasses import replace

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


def test_quantized_activations_are_the_hosts_unless_given(monkeypatch):
    host = _host(torch.float32, 4)
    monkeypatch.setattr(config_module, "host_defaults", lambda: host)
    assert EngineConfig(device="cpu").resolved_quantized_activations() == "int16"
    monkeypatch.setattr(config_module, "host_defaults", lambda: replace(host, quantized_activations="int8"))
    assert EngineConfig(device="cpu").resolved_quantized_activations() == "int8"
    config = EngineConfig(device="cpu", quantized_activations="int16")
    assert config.resolved_quantized_activations() == "int16"


def test_explicit_dtype_wins():
    assert EngineConfig(device="cpu", dtype="float32").resolved_dtype() == torch.float32


BAD = [("quantization", "int3"), ("dtype", "float8"), ("block_size", 0), ("quantized_max_rows", -1)]
BAD += [("quantized_activations", "int4")]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_kv_offload_flags():
    for bad in (dict(kv_offload_max_bytes=10**6), dict(kv_offload_dir="/tmp/kv", kv_offload_max_bytes=0)):
        with pytest.raises(ValueError, match="kv_offload_max_bytes"):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="kv_offload_cpu_bytes"):
        EngineConfig(kv_offload_cpu_bytes=-1)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(kv_offload_dir="/tmp/kv", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_offload_dir"):
        EngineConfig(kv_offload_dir="")
    EngineConfig(kv_offload_dir="/tmp/kv", kv_offload_max_bytes=10**9, kv_offload_cpu_bytes=10**9)


def test_kv_offload_command_line_flags():
    from duoserve.cli import build_parser
    from duoserve.config import engine_config_from_args

    argv = [
        "generate",
        "--kv-offload-dir",
        "/tmp/kv",
        "--kv-offload-max-bytes",
        "1000",
        "--kv-offload-cpu-bytes",
        "5",
    ]
    config = engine_config_from_args(build_parser().parse_args(argv))
    assert (config.kv_offload_dir, config.kv_offload_max_bytes, config.kv_offload_cpu_bytes) == (
        "/tmp/kv",
        1000,
        5,
    )


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("auto", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp8_e4m3", torch.float8_e4m3fn),
        ("fp8_e5m2", torch.float8_e5m2),
        ("int8", torch.int8),
    ],
)
def test_kv_cache_dtypes(name, dtype):
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_dtype=name)
    assert config.resolved_kv_dtype() == dtype


@pytest.mark.parametrize("name", ["fp8", "int4", "float8_e4m3fn", "uint8", ""])
def test_bad_kv_cache_dtype_names_the_choices(name):
    choices = "auto, bfloat16, float16, float32, fp8_e4m3, fp8_e5m2, int8"
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of {choices}, got '{name}'"):
        EngineConfig(kv_cache_dtype=name)


def test_kv_scales_path_says_there_are_no_static_scales():
    for kv_cache_dtype in ("int8", "auto"):
        with pytest.raises(ValueError, match="kv_scales_path: .* float16 scale per .* no static scales"):
            EngineConfig(kv_cache_dtype=kv_cache_dtype, kv_scales_path="scales.json")


def test_kv_scales_command_says_there_is_nothing_to_calibrate(capsys):
    from duoserve.cli import main

    assert main(["kv-scales", "model.gguf", "--kv-cache-dtype", "int8", "-o", "scales.json"]) == 2
    assert "no static scales to calibrate" in capsys.readouterr().err
