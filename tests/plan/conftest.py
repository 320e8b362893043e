"""A fixed profile (a step model of SmolLM2's order of magnitude on a small CPU) for planner tests that
are about the planner's logic rather than about measuring."""

from __future__ import annotations

import pytest

from duoserve.plan.profile import KVTransferModel, Profile, WorkerLimits
from duoserve.plan.step_model import StepModel


@pytest.fixture
def fixed_profile() -> Profile:
    return Profile(
        StepModel(intercept=0.01, kernel_rows=3e-4, decode_context=1e-6, prefill_attention=1e-4),
        WorkerLimits(
            num_kv_blocks=4000,
            block_size=16,
            max_model_len=8192,
            max_num_batched_tokens=512,
            max_num_seqs=128,
        ),
        KVTransferModel(fixed_seconds=1e-3, seconds_per_token=2e-6),
        engine_args={"model": None},
        host={"cpu": "test"},
    )
