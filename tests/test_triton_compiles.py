"""The Triton kernels compile for a Hopper GPU (sm_90), checked on a CPU.

The suite runs the kernels in Triton's interpreter, which accepts programs the compiler rejects; GPUs are
rarely lent here. benchmarks/triton_aot_check.py records the launches a selection of the kernel tests
makes (with the GPU's tiles and dtypes) and compiles each for sm_90 down to the cubin with the ptxas
that Triton's wheel carries: attention (decode split and not, prefill, the KV store, int8/FP8 pools) and
the fused norm, RoPE and activation, and the matrix-vector kernel, in each dtype (~20 s on 2 cores).
"""

from __future__ import annotations

import pytest

from tests.helpers import run_compiled_triton

pytest.importorskip("triton")

SELECTION = " or ".join(
    [
        "mixed_step",  # decode + prefill, float32/bfloat16/float16, windows and soft caps
        "decode_matches_per_sequence",  # split decodes: reduced in the attention launch, or a second kernel
        "dequantized_pool",  # int8 and FP8 pools
        "prefill_over_cached_context",
        "(rope_in_place and 8-2-64-64)",
        "(act_mul and 1500 and silu)",
        "(norm_and_add and 576)",
        "(gemv_matches_torch and 1-64-512) or model_with_triton_gemv",  # the matrix-vector kernel
        "(argmax_rows_matches and 1-128256)",  # atomics and L2 loads
    ]
)


def test_kernels_compile_for_hopper() -> None:
    # (the script sets TRITON_INTERPRET where it records, and compiles without it)
    result = run_compiled_triton(["benchmarks/triton_aot_check.py", "--jobs", "2", "-k", SELECTION])
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    compiled, _, total = summary.partition(" specializations")[0].partition(" of ")
    kernels = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    assert compiled == total and int(total) >= 20, summary
    assert kernels == {
        "_paged_attention_kernel",
        "_reduce_splits_kernel",
        "_store_kv_kernel",
        "_rope_qk_kernel",
        "_act_mul_kernel",
        "_rms_norm_kernel",
        "_argmax_kernel",
        "_gemv_kernel",
    }
