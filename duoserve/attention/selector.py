"""Which attention backend an engine runs: the config's choice, resolved against the device."""

from __future__ import annotations

import torch

from duoserve.attention.backend import AttentionBackend
from duoserve.attention.cpu_backend import CpuAttentionBackend, cpu_kernels_available
from duoserve.attention.torch_backend import TorchAttentionBackend


def make_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """auto: the paged C++ kernel on CPU where it builds, torch elsewhere (CUDA until Triton lands)."""
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return TorchAttentionBackend()
    if device.type != "cpu":
        raise ValueError(f"attention_backend cpu runs on the CPU, not on {device}")
    if cpu_kernels_available():
        return CpuAttentionBackend()
    if name == "cpu":
        raise ValueError("attention_backend cpu: its kernel could not be built here (see the warning)")
    return TorchAttentionBackend()
