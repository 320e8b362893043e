"""What the GPU compiler makes of the fused ops' rounding, checked on a CPU (no GPU needed).

RoPE rounds each product to the model's dtype before the sum, as torch's mul, mul and add do. Rounded by a
float32 -> float16 -> float32 cast, Triton's compiler (3.6, sm_90) dropped the round trip and fused each
product into an FMA: on an H200 float16 RoPE came out one ulp off torch's, while the interpreter, which the
rest of these tests use, rounds the casts as written. So the kernel is compiled for sm_90 here (Triton's
wheel carries ptxas) and its PTX must hold no FMA, in each dtype that rounds.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_compiled_triton

pytest.importorskip("triton")

# In a process of its own: the package's conftest makes this one's kernels interpreted ones.
COMPILE = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from duoserve.models import triton_ops

dtype, rounding, store = sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3]))
names = ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "v_ptr", "k_pool", "v_pool")
pointers = {**{name: "*" + dtype for name in names}, "slots": "*i64"}
strides = {"stride_" + s: "i32" for s in ("qt", "qh", "kt", "kh", "ct", "st", "vt", "vh", "pb", "pt", "ph")}
sizes = {"NUM_Q_HEADS": 8, "Q_HEADS_PAD": 8, "NUM_K_HEADS": 2, "K_HEADS_PAD": 2, "HALF": 32, "HALF_PAD": 32}
constants = {**sizes, "ROUND": rounding, "STORE": store}
signature = {**pointers, **strides, "block_size": "i32", **{name: "constexpr" for name in constants}}
source = ASTSource(triton_ops._rope_qk_kernel, signature, constants)
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
print(json.dumps({"fma": len(re.findall(r"\\bfma\\.", ptx)), "mul": len(re.findall(r"\\bmul\\.f32", ptx))}))
"""


@pytest.mark.parametrize(("dtype", "rounding"), [("fp16", 2), ("bf16", 1)])
def test_rope_products_are_rounded_not_fused_on_the_gpu(dtype: str, rounding: int) -> None:
    # With the KV store in its launch (the decode path): the same rounding code as RoPE alone, plus the
    # store's branch, which the interpreter cannot check for type errors and the compiler does.
    result = run_compiled_triton(["-c", COMPILE, dtype, str(rounding), "1"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["mul"] > 0  # the products are there, as multiplies
    assert counts["fma"] == 0, counts
