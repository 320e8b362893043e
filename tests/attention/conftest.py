"""Without a GPU, the Triton backend's tests run its kernels in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is defined (duoserve.attention.triton_kernels' import), so it is
set here, before any test module of this package imports it. Nothing else in the suite uses Triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
