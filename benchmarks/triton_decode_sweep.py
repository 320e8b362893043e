"""Tile sweep of the Triton paged decode kernel on a GPU: which keys-per-iteration, warps, pipeline stages
and split target read the KV cache fastest, at the batch sizes the decode roofline is measured at.

    python benchmarks/triton_decode_sweep.py                     # Llama 3.2 1B's attention shape, bf16
    python benchmarks/triton_decode_sweep.py --out DIR           # also DIR/decode_sweep.json, best_tiles.json

Each configuration is checked against the default tiles' output, then timed in CUDA graphs (20 launches a
graph, median of 10 replays: launched one by one, a small batch's time is the host's launch cost) and given
as the KV bandwidth it reaches: the KV bytes a step reads / its time, against the device copy bandwidth.
The kernels compile first in --jobs processes (Triton's disk cache), so the timed process loads them: a
device run is minutes, and most of it would be compiling.
`best_tiles.json` holds the configuration with the lowest geometric mean of (time / that batch's best);
`gpu_suite.py --tiles` measures whole decode steps with it.
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

from duoserve.attention import triton_kernels as tk

HEADS, KV_HEADS, DIM, BLOCK_SIZE = 32, 8, 64, 16  # Llama 3.2 1B


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    return parser.parse_args()


def make_case(batch: int, context: int, device: torch.device) -> dict:
    """Random bf16 pools; each sequence over its own shuffled blocks, table width max_len / block size
    (as the engine's captured graphs pass it)."""
    gen = torch.Generator(device=device).manual_seed(batch)
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    pools = [
        torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, DIM, generator=gen, device=device, dtype=torch.bfloat16)
        for _ in range(2)
    ]
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(batch))
    tables = order.view(batch, per_seq).to(device)
    q = torch.randn(batch, HEADS, DIM, generator=gen, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    return {"q": q, "k": pools[0], "v": pools[1], "tables": tables, "lens": lens}


def run(case: dict, tiles: tk.Tiles) -> torch.Tensor:
    out = torch.empty_like(case["q"])
    tk.paged_decode(out, case["q"], case["k"], case["v"], case["tables"], case["lens"], DIM**-0.5, tiles)
    return out


def configs(args, sms: int) -> list[tk.Tiles]:
    base = tk.gpu_tiles(sms)
    grid = [
        dataclasses.replace(base, decode_block_n=n, decode_num_warps=w, decode_num_stages=s)
        for n, w, s in itertools.product(args.block_n, args.warps, args.stages)
    ]
    grid += [dataclasses.replace(base, target_programs=p * sms) for p in args.programs_per_sm]
    return list(dict.fromkeys(grid))


def _compile(job: tuple[list[int], int, list[dict]]) -> int:
    """A worker: run each configuration once per batch (Triton compiles and caches)."""
    batches, context, tile_dicts = job
    device = torch.device("cuda")
    cases = [make_case(b, context, device) for b in batches]
    compiled = 0
    for tiles in tile_dicts:
        try:  # one that fails (out of shared memory, say) is skipped again when timed
            for case in cases:
                run(case, tk.Tiles(**tiles))
            compiled += 1
        except Exception as error:  # noqa: BLE001
            print(f"{tiles}: {str(error).splitlines()[0][:200]}", flush=True)
    torch.cuda.synchronize()
    return compiled


def graph_us(fn, launches: int = 20, replays: int = 10) -> float:
    """Device time of one fn() in microseconds: `launches` calls captured in a CUDA graph, replayed. (Timed
    launch by launch, a decode of a small batch measures the host's launch cost, not the kernel.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    grid = configs(args, sms)
    jobs = [
        (args.batches, args.context, [dataclasses.asdict(t) for t in grid[i :: args.jobs]])
        for i in range(args.jobs)
    ]
    with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, jobs))

    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (graph_us(lambda: dst.copy_(src), launches=5) / 1e6)
    kv_per_token = 2 * KV_HEADS * DIM * 2
    default = tk.gpu_tiles(sms)
    rows = []
    for batch in args.batches:
        case = make_case(batch, args.context, device)
        want = run(case, default).float()
        kv_bytes = batch * args.context * kv_per_token
        for tiles in grid:
            try:
                err = ((run(case, tiles).float() - want).norm() / want.norm()).item()
            except Exception:  # noqa: BLE001 - reported by the compile step
                continue
            ms = graph_us(lambda c=case, t=tiles: run(c, t)) / 1e3
            rows.append(
                {
                    "batch": batch,
                    "block_n": tiles.decode_block_n,
                    "warps": tiles.decode_num_warps,
                    "stages": tiles.decode_num_stages,
                    "programs_per_sm": tiles.target_programs // sms,
                    "splits": tk.decode_splits(batch, KV_HEADS, case["tables"].shape[1] * BLOCK_SIZE, tiles),
                    "us": ms * 1e3,
                    "kv_GBs": kv_bytes / (ms / 1e3) / 1e9,
                    "of_copy_bw": kv_bytes / (ms / 1e3) / bandwidth,
                    "rel_err_vs_default": err,
                    "default": tiles == default,
                }
            )
        del case
    if args.out:  # the measurements first: nothing below may lose them
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_sweep.json"), "w") as f:
            json.dump({"rows": rows, "copy_bandwidth_GBs": bandwidth / 1e9}, f, indent=1)
    best = {
        b: min(r["us"] for r in rows if r["batch"] == b and r["rel_err_vs_default"] < 1e-2)
        for b in args.batches
    }
    scores = {}
    for tiles in grid:
        mine = [
            r
            for r in rows
            if (r["block_n"], r["warps"], r["stages"], r["programs_per_sm"])
            == (
                tiles.decode_block_n,
                tiles.decode_num_warps,
                tiles.decode_num_stages,
                tiles.target_programs // sms,
            )
        ]
        if len(mine) == len(args.batches) and all(r["rel_err_vs_default"] < 1e-2 for r in mine):
            scores[tiles] = math.exp(statistics.fmean(math.log(r["us"] / best[r["batch"]]) for r in mine))
    chosen = min(scores, key=scores.get)
    report = {
        "device": torch.cuda.get_device_name(device),
        "triton": __import__("triton").__version__,
        "copy_bandwidth_GBs": bandwidth / 1e9,
        "context": args.context,
        "rows": rows,
        "best_us": best,
        "chosen": dataclasses.asdict(chosen),
        "chosen_score": scores[chosen],
        "default_score": scores.get(default),
    }
    for batch in args.batches:
        top = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["us"])
        print(f"\n### batch {batch}, context {args.context}: fastest 6 of {len(top)}, and the default")
        for r in top[:6] + [r for r in top if r["default"]]:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    print(f"\nchosen (geometric mean of time / best: {scores[chosen]:.3f}; default {scores.get(default)}):")
    print(dataclasses.asdict(chosen))
    if args.out:
        with open(os.path.join(args.out, "decode_sweep.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, "best_tiles.json"), "w") as f:
            json.dump(dataclasses.asdict(chosen), f)


if __name__ == "__main__":
    main()
