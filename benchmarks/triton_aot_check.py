"""Compile every Triton kernel specialization the CPU tests launch for a real GPU target, without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, how the suite runs the kernels here) accepts programs the
compiler rejects (a `tl.dot` under 16 rows, a shape that is not a power of two, a dtype the target lacks),
and GPU time is scarce: this finds those errors on a CPU before a device run does.

    PYTHONPATH=. python benchmarks/triton_aot_check.py                   # sm_90 (H100/H200)
    PYTHONPATH=. python benchmarks/triton_aot_check.py --arch 80 -k rope tests/models/test_triton_ops.py

1. Runs the given pytest files under the interpreter with each kernel launch recorded: the kernel, the
   argument types (tensors' dtypes, ints, floats), the constexpr values and the launch options.
2. In a fresh process (compiled mode, where `@triton.jit` gives compilable functions), compiles each
   distinct specialization with `triton.compile` for `GPUTarget("cuda", arch, 32)`, down to the cubin
   (Triton's wheel carries ptxas), and prints one line per specialization; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor

DEFAULT_TESTS = [
    "tests/attention/test_triton_backend.py",
    "tests/attention/test_triton_kernels_quantized.py",
    "tests/models/test_triton_ops.py",
    "tests/models/test_triton_gemv.py",
]
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _tensor_type(dtype) -> str:
    import torch

    names = {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.int8: "i8",
        torch.uint8: "u8",
        torch.int16: "i16",
        torch.int32: "i32",
        torch.int64: "i64",
        torch.bool: "i1",
        torch.float8_e4m3fn: "fp8e4nv",
        torch.float8_e5m2: "fp8e5",
    }
    return "*" + names[dtype]


def _arg_type(value) -> tuple[str, object]:
    """(signature type, constexpr value or None) of one runtime argument, as Triton's JIT specialises it."""
    import torch

    if isinstance(value, torch.Tensor):
        return _tensor_type(value.dtype), None
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:  # the JIT turns 1 into a constant
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"unsupported argument {type(value).__name__}")


def _compiled_mode_choices() -> None:
    """Make the launches the tests record those a GPU makes: its tiles (an H100/H200's 132 SMs)."""
    import torch

    from duoserve.attention import triton_backend, triton_kernels

    def gpu_tiles(device: torch.device) -> triton_kernels.Tiles:
        return triton_kernels.gpu_tiles(132)

    triton_kernels.tiles_for = triton_backend.tiles_for = gpu_tiles


def record(tests: list[str], out_path: str) -> int:
    """Run `tests` in the interpreter, writing each distinct launch's specialization to out_path."""
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    _compiled_mode_choices()
    seen: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = self.arg_names
        bound = dict(zip(names, args, strict=False))  # the rest come as keywords
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k in OPTIONS}
        signature, constexprs = {}, {}
        for name in names:
            annotation = str(fn.__annotations__.get(name, ""))
            if "constexpr" in annotation:
                signature[name] = "constexpr"
                constexprs[name] = bound[name]
                continue
            kind, value = _arg_type(bound[name])
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
        if "IEEE" in constexprs:  # the interpreter forces exact float32 dots; compiled code takes q's dtype
            constexprs["IEEE"] = signature["q_ptr"] == "*fp32"
        spec = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            "signature": signature,
            "constexprs": constexprs,
            "options": options,
        }
        seen.setdefault(json.dumps(spec, sort_keys=True, default=str), spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    code = pytest.main(["-q", "-p", "no:cacheprovider", *tests])
    with open(out_path, "w") as f:
        json.dump(list(seen.values()), f, default=str)
    return int(code)


def _compile_one(job: tuple[dict, int]) -> tuple[bool, str]:
    """(compiled, its line) for one recorded specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, arch = job
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    label = f"{spec['kernel']} {sorted(spec['constexprs'].items())} {spec['options']}"
    try:
        source = ASTSource(kernel, spec["signature"], spec["constexprs"])
        meta = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"]).metadata
    except Exception:  # noqa: BLE001 - each failure is reported, then the next is compiled
        return False, f"FAIL {label}\n{traceback.format_exc(limit=3)}"
    types = sorted({t for t in spec["signature"].values() if t.startswith("*")})
    return True, f"ok   {label} {types} shared={meta.shared}"


def compile_all(specs_path: str, arch: int, jobs: int) -> int:
    """Compile each recorded specialization for cuda:arch in `jobs` processes; 0 when all compile."""
    with open(specs_path) as f:
        specs = json.load(f)
    with ProcessPoolExecutor(jobs) as pool:
        results = list(pool.map(_compile_one, [(spec, arch) for spec in specs]))
    for _, line in results:
        print(line)
    failures = sum(not ok for ok, _ in results)
    print(f"{len(specs) - failures} of {len(specs)} specializations compiled for sm_{arch}")
    return 1 if failures or not specs else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("-k", dest="keyword", help="pytest's -k: only the tests it selects")
    parser.add_argument("--record-to", help=argparse.SUPPRESS)
    parser.add_argument("--compile-from", help=argparse.SUPPRESS)
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS)
    args = parser.parse_args()
    selection = [*args.tests, *(["-k", args.keyword] if args.keyword else [])]
    if args.record_to:
        sys.exit(record(selection, args.record_to))
    if args.compile_from:
        sys.exit(compile_all(args.compile_from, args.arch, args.jobs))
    with tempfile.TemporaryDirectory() as tmp:
        specs = os.path.join(tmp, "specs.json")
        me = [sys.executable, os.path.abspath(__file__)]
        if subprocess.run([*me, "--record-to", specs, *selection]).returncode:
            sys.exit("the tests failed under the interpreter")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [*me, "--compile-from", specs, "--arch", str(args.arch), "--jobs", str(args.jobs)]
        sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
