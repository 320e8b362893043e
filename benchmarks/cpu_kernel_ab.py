"""A/B of one C++ matmul kernel against its source at another git revision, in one process, alternated.

    PYTHONPATH=. python benchmarks/cpu_kernel_ab.py --kernel int4 --base HEAD --rows 1 2 4 16 64
    PYTHONPATH=. python benchmarks/cpu_kernel_ab.py --kernel int8 --base HEAD~3 --rows 1 4 16

The sessions' VMs change speed by up to 2x between minutes, so two runs of a benchmark, one per tree,
compare the machine as much as the kernels. This builds the kernel's source twice as separate
extensions (the revision's and the working tree's, each under its own op namespace, -march=native as
cpu_kernels.py builds it) and times them in turns, in the same process, on the same weights.
`--define NAME=VALUE ...` adds the tree's source built with each switch: the variants of a change.

Workloads, as a decode step reads them (from memory, not cache):
- int4 (models/csrc/int4pack_mm_cpu.cpp): SmolLM2-135M's 30 layers of 4-bit matrices (qkv 960x576,
  o 576x576, gate_up 3072x576, down 576x1536: 120 matmuls, 66 MB) in order, random codes;
- int8 (models/csrc/int8_mm_cpu.cpp): hardware.py's 8-bit measurement matrix (16384 x 2048, 32 MB, an L3
  cache's worth; `--int8-shape N K` another), after reading 128 MB elsewhere to evict it; torch's
  `_weight_int8pack_mm` beside;
- q4 (models/csrc/quantized_matmul_cpu.cpp, float32 models' 4-bit kernel, int16 activations): the int4
  workload's matrices in GGUF's layout. `--march x86-64-v3` builds both sides as an AVX2-only CPU's.
Prints the median time of each, its rate in bytes of weights read per second, and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "int4": ("duoserve/models/csrc/int4pack_mm_cpu.cpp", "int4pack_mm"),
    "int8": ("duoserve/models/csrc/int8_mm_cpu.cpp", "int8_mm"),
    "q4": ("duoserve/models/csrc/quantized_matmul_cpu.cpp", "q4_matmul"),
}
SMOLLM2_LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of a layer's matrices


# The headers the sources include by a relative path: copied beside them (those a revision has).
HEADERS = ("duoserve/csrc/cpu_ops.h", "duoserve/csrc/cpu_vec.h", "duoserve/csrc/cpu_amx.h")


def sources_at(revision: str | None, path: str) -> dict[str, str]:
    """The kernel's source and the header at a git revision (None: the working tree), by repo path."""

    def read(name: str) -> str | None:
        if revision is None:
            file = ROOT / name
            return file.read_text() if file.exists() else None
        shown = subprocess.run(
            ["git", "show", f"{revision}:{name}"], cwd=ROOT, capture_output=True, text=True
        )
        return shown.stdout if shown.returncode == 0 else None

    files = {name: text for name in (path, *HEADERS) if (text := read(name)) is not None}
    if path not in files:
        raise SystemExit(f"{path} does not exist at {revision or 'the working tree'}")
    return files


def build(
    name: str, files: dict[str, str], path: str, op: str, build_root: Path, march: str, defines: list[str]
) -> Callable:
    """Compile `files[path]` (its ops renamed into namespace `name`, the other files laid out beside it as
    in the repository) as extension `name` with -D `defines`, and return the op."""
    directory = build_root / name
    for relative, text in files.items():
        if relative == path:
            text = text.replace("TORCH_LIBRARY_FRAGMENT(duoserve_cpu", f"TORCH_LIBRARY_FRAGMENT({name}")
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    load(
        name=name,
        sources=[str(directory / path)],
        extra_cflags=["-O3", f"-march={march}", "-fopenmp", *(f"-D{d}" for d in defines)],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        build_directory=str(directory),
    )
    return getattr(getattr(torch.ops, name), op)


def layers_workload(rows: int, matrix: Callable[[int, int], tuple], dtype: torch.dtype):
    """SmolLM2's 120 layer matmuls in order, each `matrix(out, width)` (random codes and scales) with `rows`
    rows of x in `dtype`; returns (calls, bytes of weights, nothing to do between runs)."""
    calls = []
    for _ in range(30):
        for out, width in SMOLLM2_LAYER:
            calls.append((torch.randn(rows, width).to(dtype), *matrix(out, width)))
    nbytes = sum(sum(t.numel() * t.element_size() for t in call[1:]) for call in calls)
    return calls, nbytes, lambda: None


def int4_matrix(out: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 layout: codes [N, K/2], (scale, zero) pairs [K/32, N, 2] in bfloat16."""
    return torch.randint(0, 256, (out, width // 2), dtype=torch.uint8), torch.randn(
        width // 32, out, 2
    ).bfloat16()


def q4_matrix(out: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 models' GGUF groups: codes [N, K/2], fp16 scales then mins [N, 2, K/32]."""
    codes = torch.randint(0, 256, (out, width // 2), dtype=torch.uint8)
    return codes, (torch.rand(out, 2, width // 32) * 0.01).half()


def int8_workload(rows: int, shape: tuple[int, int]) -> tuple[list[tuple], int, Callable[[], None]]:
    out, width = shape
    codes = torch.randint(-128, 128, (out, width), dtype=torch.int8)
    scales = torch.rand(out).bfloat16()
    other = torch.ones(32 << 20)
    return [(torch.randn(rows, width).bfloat16(), codes, scales)], codes.numel(), lambda: other.sum()


def time_variants(variants: dict[str, Callable], calls: list[tuple], evict: Callable[[], None], reps: int):
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            op = variants[name]
            evict()
            start = time.perf_counter()
            for args in calls:
                op(*args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kernel", choices=sorted(SOURCES), default="int4")
    parser.add_argument("--base", default="HEAD", help="git revision of the other source")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--build-dir", type=Path, default=Path.home() / ".cache" / "duoserve" / "kernel_ab")
    parser.add_argument("--march", default="native", help="gcc -march for both builds, e.g. x86-64-v3 (AVX2)")
    parser.add_argument("--define", nargs="*", default=[], help="more variants: the tree with -D NAME=VALUE")
    parser.add_argument(
        "--int8-shape", type=int, nargs=2, default=[16384, 2048], help="N K (SmolLM2's lm_head: 49152 576)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path, op = SOURCES[args.kernel]
    tag = "".join(c if c.isalnum() else "_" for c in args.march)
    build_one = functools.partial(build, path=path, op=op, build_root=args.build_dir, march=args.march)
    variants = {
        args.base: build_one(f"ab_{args.kernel}_{tag}_base", sources_at(args.base, path), defines=[]),
        "tree": build_one(f"ab_{args.kernel}_{tag}_tree", sources_at(None, path), defines=[]),
    }
    for define in args.define:  # the tree's source under a -D switch of its own: variants of one change
        label = "".join(c if c.isalnum() else "_" for c in define)
        variants[define] = build_one(
            f"ab_{args.kernel}_{tag}_{label}", sources_at(None, path), defines=[define]
        )
    if args.kernel == "int8":
        variants["torch"] = torch.ops.aten._weight_int8pack_mm
    int8 = functools.partial(int8_workload, shape=tuple(args.int8_shape))
    workload = {
        "int4": functools.partial(layers_workload, matrix=int4_matrix, dtype=torch.bfloat16),
        "int8": int8,
        "q4": functools.partial(layers_workload, matrix=q4_matrix, dtype=torch.float32),
    }[args.kernel]
    print(f"{args.kernel}: {path} at {args.base} vs the working tree, {torch.get_num_threads()} threads")
    print("| rows | " + " | ".join(f"{name} ms" for name in variants) + f" | tree / {args.base} |")
    print("|---|" + "---|" * (len(variants) + 1))
    for rows in args.rows:
        calls, nbytes, evict = workload(rows)
        medians = time_variants(variants, calls, evict, args.reps)
        cells = " | ".join(f"{t * 1e3:.3f} ({nbytes / t / 1e9:.0f} GB/s)" for t in medians.values())
        print(f"| {rows} | {cells} | {medians['tree'] / medians[args.base]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
