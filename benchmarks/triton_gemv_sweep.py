"""Tile sweep of the Triton matrix-vector kernel (duoserve/models/triton_gemv.py) against cuBLAS (torch's
F.linear) on a GPU: Llama 3.2 1B's projections at 1 and 2 rows (--rows), bf16.

    PYTHONPATH=. python benchmarks/triton_gemv_sweep.py --out DIR     # DIR/gemv_sweep.json

Each product is checked against F.linear (relative error), then timed inside a CUDA graph (20 launches a
graph, median of 10 replays; launched one by one, a microsecond kernel's time is the host's launch cost)
and given as the weight bandwidth it reaches against the device copy bandwidth. The launches cycle through
copies of the weight filling 4x the L2 cache, so that each reads its weight from HBM as a model's step does:
the first sweep (2026-12-04) re-read one 8-33 MB weight, which the H200's 60 MB L2 held, and its winners
lost to cuBLAS in the whole step. The kernels compile first
in --jobs processes (Triton's disk cache). Prints, per shape and row count, cuBLAS, the default tiles and
the best ones; and which tiles are best over all shapes at each row count (the geometric mean of time over
each shape's best), with the whole layer's time (q/k/v, o, gate_up, down) both ways.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from benchmarks.triton_attention_sweep import graph_us
from duoserve.models import triton_gemv as tg

# Llama 3.2 1B's layer: (name, outputs, inputs). (lm_head: cuBLAS read it at the copy bandwidth.)
SHAPES = [
    ("qkv", 3072, 2048),
    ("o", 2048, 2048),
    ("gate_up", 16384, 2048),
    ("down", 2048, 8192),
]
LAYER = ("qkv", "o", "gate_up", "down")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    return parser.parse_args()


def grid(args) -> list[tg.GemvTiles]:
    tiles = [
        tg.GemvTiles(block_n=n, block_k=k, num_warps=w)
        for n, k, w in itertools.product(args.block_n, args.block_k, args.warps)
    ]
    return list(dict.fromkeys([*(tg.tiles_for(n, k) for _, n, k in SHAPES), *tiles]))


def _compile(job: tuple[list[int], list[dict]]) -> int:
    """A worker: one launch per row count and tiles (the kernel specialises on both, not on the shape)."""
    rows_list, tile_dicts = job
    w = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    done = 0
    for rows, tiles in itertools.product(rows_list, tile_dicts):
        try:
            tg.gemv(
                torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16), w, None, tg.GemvTiles(**tiles)
            )
            done += 1
        except Exception as error:  # noqa: BLE001 - reported; the timing skips it too
            print(f"{tiles} at {rows} rows: {str(error).splitlines()[0][:200]}", flush=True)
    torch.cuda.synchronize()
    return done


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    tiles_grid = grid(args)
    chunks = [[dataclasses.asdict(t) for t in tiles_grid[i :: args.jobs]] for i in range(args.jobs)]
    with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, [(args.rows, chunk) for chunk in chunks]))

    bandwidth = copy_bandwidth(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    gen = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k**0.5
        copies = [w] + [w.clone() for _ in range(-(-4 * l2 // w.nbytes) - 1)]  # 4x L2 of weights
        cold = itertools.cycle(copies).__next__  # each launch the next copy: read from HBM
        for rows in args.rows:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
            want = F.linear(x, w).float()
            base = {"shape": name, "rows": rows, "n": n, "k": k, "copies": len(copies)}
            us = graph_us(lambda x=x, c=cold: F.linear(x, c()))
            rows_out.append(
                {**base, "kernel": "cublas", "us": us, "of_copy_bw": w.nbytes / (us / 1e6) / bandwidth}
            )
            for tiles in tiles_grid:
                try:
                    got = tg.gemv(x, w, None, tiles).float()
                except Exception:  # noqa: BLE001 - reported by the compile step
                    continue
                err = ((got - want).norm() / want.norm()).item()
                us = graph_us(lambda x=x, t=tiles, c=cold: tg.gemv(x, c(), None, t))
                rows_out.append(
                    {
                        **base,
                        "kernel": "triton",
                        **dataclasses.asdict(tiles),
                        "us": us,
                        "of_copy_bw": w.nbytes / (us / 1e6) / bandwidth,
                        "rel_err": err,
                        "default": tiles == tg.tiles_for(n, k),
                    }
                )
        del w, copies
    report = {
        "device": torch.cuda.get_device_name(device),
        "copy_bandwidth_GBs": bandwidth / 1e9,
        "rows": rows_out,
    }
    if args.out:  # the measurements first
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemv_sweep.json"), "w") as f:
            json.dump(report, f, indent=1)
    summarize(rows_out, args.rows, report)
    if args.out:
        with open(os.path.join(args.out, "gemv_sweep.json"), "w") as f:
            json.dump(report, f, indent=1)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write), median of 10 (CUDA events)."""
    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / statistics.median(times[2:])


def summarize(rows_out: list[dict], row_counts: list[int], report: dict) -> None:
    def key(r: dict) -> tuple:
        return (r["block_n"], r["block_k"], r["num_warps"])

    triton_rows = [r for r in rows_out if r["kernel"] == "triton" and r["rel_err"] < 1e-2]
    report["chosen"] = {}
    for rows in row_counts:
        print(f"\n### {rows} row(s): us (share of the copy bandwidth)")
        mine = [r for r in triton_rows if r["rows"] == rows]
        best = {s: min(r["us"] for r in mine if r["shape"] == s) for s, _, _ in SHAPES}
        scores = {}
        for tiles in {key(r) for r in mine}:
            times = [r["us"] / best[r["shape"]] for r in mine if key(r) == tiles]
            if len(times) == len(SHAPES):
                scores[tiles] = math.exp(statistics.fmean(math.log(t) for t in times))
        chosen = min(scores, key=scores.get)
        report["chosen"][rows] = dict(zip(("block_n", "block_k", "num_warps"), chosen, strict=True))
        layer = {"cublas": 0.0, "chosen": 0.0}
        fastest_of = {}
        for shape, _, _ in SHAPES:
            cublas = next(
                r for r in rows_out if r["kernel"] == "cublas" and r["rows"] == rows and r["shape"] == shape
            )
            pick = next(r for r in mine if r["shape"] == shape and key(r) == chosen)
            fastest = fastest_of[shape] = min((r for r in mine if r["shape"] == shape), key=lambda r: r["us"])
            default = next((r for r in mine if r["shape"] == shape and r["default"]), None)
            print(
                f"{shape:8s} cublas {cublas['us']:7.2f} ({cublas['of_copy_bw']:.0%})  "
                f"chosen {pick['us']:7.2f} ({pick['of_copy_bw']:.0%})  "
                f"fastest {fastest['us']:7.2f} {key(fastest)}  default "
                + (f"{default['us']:7.2f}" if default else "-")
            )
            if shape in LAYER:
                layer["cublas"] += cublas["us"]
                layer["chosen"] += pick["us"]
        print(
            f"chosen tiles {chosen} (score {scores[chosen]:.3f}); a layer's four projections: cuBLAS "
            f"{layer['cublas']:.1f} us, Triton {layer['chosen']:.1f} us"
        )
        report["chosen"][rows]["layer_us"] = layer
        report.setdefault("fastest", {})[rows] = {
            shape: {
                "n": n,
                "k": k,
                "tiles": dict(zip(("block_n", "block_k", "num_warps"), key(fastest_of[shape]), strict=True)),
                "us": fastest_of[shape]["us"],
                "cublas_us": next(
                    r["us"]
                    for r in rows_out
                    if r["kernel"] == "cublas" and r["rows"] == rows and r["shape"] == shape
                ),
            }
            for shape, n, k in SHAPES
        }


if __name__ == "__main__":
    main()
