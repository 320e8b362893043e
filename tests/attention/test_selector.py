"""The attention backend an engine gets for each --attention-backend and device."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from duoserve.attention.cpu_backend import CpuAttentionBackend
from duoserve.attention.selector import make_attention_backend
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.config import EngineConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_torch_is_torch_everywhere() -> None:
    for device in ("cpu", "cuda"):
        assert type(make_attention_backend("torch", torch.device(device))) is TorchAttentionBackend


def test_auto_on_cuda_is_triton_where_installed() -> None:
    backend = make_attention_backend("auto", torch.device("cuda"))
    assert type(backend).__name__ == ("TritonAttentionBackend" if HAS_TRITON else "TorchAttentionBackend")


def test_auto_on_other_devices_is_torch() -> None:
    assert type(make_attention_backend("auto", torch.device("mps"))) is TorchAttentionBackend


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the CPU kernel cannot be built")
def test_auto_and_cpu_on_the_cpu_are_the_kernel() -> None:
    for name in ("auto", "cpu"):
        assert type(make_attention_backend(name, torch.device("cpu"))) is CpuAttentionBackend


def test_cpu_on_another_device_and_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="runs on the CPU"):
        make_attention_backend("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    assert EngineConfig(attention_backend="triton").attention_backend == "triton"


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        make_attention_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        make_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on CUDA"):
        make_attention_backend("triton", torch.device("mps"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_on_the_cpu_under_the_interpreter(monkeypatch) -> None:
    from duoserve.attention import triton_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_kernels.INTERPRETED:
        assert (
            type(make_attention_backend("triton", torch.device("cpu"))).__name__ == "TritonAttentionBackend"
        )
    else:  # the kernels were defined for a GPU before the variable was set: refused, not run wrongly
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            make_attention_backend("triton", torch.device("cpu"))
