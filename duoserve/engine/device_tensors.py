"""Values between the host and the device without the host waiting for the device.

On CUDA, `torch.tensor(values, device="cuda")` and `tensor.tolist()` each synchronise the stream: the host
stops until every kernel queued before finishes. With async scheduling the host prepares step n+1 while
the GPU runs step n, so the inputs of step n+1 must go up, and step n's sampled tokens come down, without
such a wait: through pinned host memory, non-blocking copies and an event per copy (as vLLM v1 does). On
the CPU both are plain tensors: nothing runs asynchronously there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a sequence, or a host tensor) on `device`, queued behind the device's work
    instead of waiting for it.

    The pinned buffer comes from torch's caching host allocator, which reuses it only once the copy
    that reads it has run.
    """
    if isinstance(values, torch.Tensor):
        if device.type != "cuda":
            return values.to(device=device, dtype=dtype)
        return values.to(dtype=dtype).pin_memory().to(device, non_blocking=True)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued right after the kernels that
    compute them, and `tolist` waits for that copy alone, not for the kernels queued after it (the next
    step's, with async scheduling)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
