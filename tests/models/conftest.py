"""Without a GPU, the model's Triton ops (duoserve/models/triton_ops.py) are tested in Triton's interpreter
on CPU tensors: TRITON_INTERPRET is read when a kernel is defined (that module's first import, which only
tests/models/test_triton_ops.py and Triton-backend engines make), so it is set here, as
tests/attention/conftest.py sets it for the attention kernels. No other model test runs Triton: CPU models
take the C++ or torch ops whatever this variable says (LlamaModel.fused_ops is off for them).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
