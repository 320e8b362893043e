"""Which attention backend an engine runs: the config's choice, resolved against the device."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from duoserve.attention.backend import AttentionBackend
from duoserve.attention.cpu_backend import CpuAttentionBackend, cpu_kernels_available
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.hardware import host_defaults

logger = logging.getLogger(__name__)


def make_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """auto: Triton's paged kernels on CUDA (torch where triton is not installed), the paged C++ kernel on
    CPU where it builds, torch elsewhere. triton on a CPU device: only under TRITON_INTERPRET=1 (tests)."""
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        return _triton(name, device)
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return TorchAttentionBackend()
    if device.type != "cpu":
        raise ValueError(f"attention_backend cpu runs on the CPU, not on {device}")
    if cpu_kernels_available():
        return CpuAttentionBackend(prefill_kernel=host_defaults().prefill_attention == "duoserve")
    if name == "cpu":
        raise ValueError("attention_backend cpu: its kernel could not be built here (see the warning)")
    return TorchAttentionBackend()


def triton_interpreted() -> bool:
    """Whether Triton interprets kernels, on CPU tensors (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton(name: str, device: torch.device) -> AttentionBackend:
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"attention_backend triton runs on CUDA, not on {device}")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "attention_backend triton runs on CUDA; on the CPU only under TRITON_INTERPRET=1 (for tests)"
        )
    if importlib.util.find_spec("triton") is None:
        if name == "triton":
            raise ValueError(
                "attention_backend triton needs the triton package (pip install 'duoserve[gpu]')"
            )
        logger.warning("triton is not installed: CUDA attention runs the torch backend (SDPA over gathers)")
        return TorchAttentionBackend()
    from duoserve.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)
