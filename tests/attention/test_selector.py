"""The attention backend an engine gets for each --attention-backend and device."""

from __future__ import annotations

import shutil

import pytest
import torch

from duoserve.attention.cpu_backend import CpuAttentionBackend
from duoserve.attention.selector import make_attention_backend
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.config import EngineConfig


def test_torch_is_torch_everywhere() -> None:
    for device in ("cpu", "cuda"):
        assert type(make_attention_backend("torch", torch.device(device))) is TorchAttentionBackend


def test_auto_off_the_cpu_is_torch() -> None:
    assert type(make_attention_backend("auto", torch.device("cuda"))) is TorchAttentionBackend


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the CPU kernel cannot be built")
def test_auto_and_cpu_on_the_cpu_are_the_kernel() -> None:
    for name in ("auto", "cpu"):
        assert type(make_attention_backend(name, torch.device("cpu"))) is CpuAttentionBackend


def test_cpu_on_another_device_and_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="runs on the CPU"):
        make_attention_backend("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
