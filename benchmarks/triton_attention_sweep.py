"""Tile sweep of the Triton paged attention kernel on a GPU, for decode steps or prefill chunks: which
keys per iteration, rows per program, warps, pipeline stages (and, decoding, split target) run fastest
on Llama 3.2 1B's heads (32 query, 8 KV, head size 64, bf16, blocks of 16).

    python benchmarks/triton_attention_sweep.py --out DIR                  # decode: batch 1/64/256 x 1k
    python benchmarks/triton_attention_sweep.py --kind prefill --out DIR   # 1x1024, 8x1024, 4x512 on 1536

Each configuration is checked against the default tiles' output, then timed in CUDA graphs (20 launches a
graph, median of 10 replays: launched one by one, a small batch's time is the host's launch cost).
Decode: as the KV bandwidth it reaches against the device copy bandwidth (KV bytes / time); prefill: as
attention TFLOP/s (4 x heads x head size per visible query-key pair). The kernels compile first in
--jobs processes (Triton's disk cache), so the timed process loads them: a device run is minutes, and
most of it would be compiling. DIR/best_<kind>_tiles.json holds the configuration with the lowest
geometric mean of (time / that shape's best); `gpu_suite.py --tiles` measures whole steps with it.
(2026-12-04, an H200: the decode sweep chose today's `triton_kernels.gpu_tiles`; BENCHMARKS.md.)
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
from duoserve.attention.backend import PrefillChunk

HEADS, KV_HEADS, DIM, BLOCK_SIZE = 32, 8, 64, 16  # Llama 3.2 1B
SCALE = DIM**-0.5


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int  # decode: the context; prefill: new tokens of each sequence
    cached: int = 0  # prefill: tokens already in the cache before the chunk


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--prefill-rows", type=int, nargs="+", default=[32, 64, 128], help="prefill only")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[2, 4, 8, 16], help="decode only")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    if args.kind == "decode":
        args.shapes = [Shape(b, 1024) for b in (1, 64, 256)]
    else:
        args.shapes = [Shape(1, 1024), Shape(8, 1024), Shape(4, 512, 1536)]
        args.warps = sorted({*args.warps, 4, 8})
    return args


# ------------------------------------------------------------------ the cases


def make_case(kind: str, shape: Shape, device: torch.device) -> dict:
    """Random bf16 pools, each sequence over its own shuffled blocks. Decode: one query per sequence at
    the end of `tokens`; prefill: `tokens` new queries after `cached` positions (their K/V in the pool,
    as the step's store leaves them)."""
    gen = torch.Generator(device=device).manual_seed(shape.batch * 7 + shape.tokens)
    context = shape.tokens + shape.cached
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = shape.batch * per_seq
    pools = [
        torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, DIM, generator=gen, device=device, dtype=torch.bfloat16)
        for _ in range(2)
    ]
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(shape.batch)).view(-1, per_seq)
    queries = shape.batch if kind == "decode" else shape.batch * shape.tokens
    case = {
        "q": torch.randn(queries, HEADS, DIM, generator=gen, device=device, dtype=torch.bfloat16),
        "k": pools[0],
        "v": pools[1],
        "tables": order.to(device),
        "lens": torch.full((shape.batch,), context, dtype=torch.long, device=device),
    }
    if kind == "prefill":
        case["chunks"] = [
            PrefillChunk(i * shape.tokens, shape.tokens, context, order[i].to(device))
            for i in range(shape.batch)
        ]
        case["layouts"] = {}  # PrefillTiles per tokens-per-tile: built before any graph capture
    return case


def run(kind: str, case: dict, tiles: tk.Tiles) -> torch.Tensor:
    out = torch.empty_like(case["q"])
    q, k, v = case["q"], case["k"], case["v"]
    if kind == "decode":
        tk.paged_decode(out, q, k, v, case["tables"], case["lens"], SCALE, tiles)
        return out
    tokens = tk.prefill_tokens_per_tile(HEADS, KV_HEADS, tiles)
    if tokens not in case["layouts"]:
        case["layouts"][tokens] = tk.prefill_tiles(case["chunks"], tokens, q.device)
    tk.paged_prefill(out, q, k, v, case["layouts"][tokens], SCALE, tiles)
    return out


def grid(args, sms: int) -> list[tk.Tiles]:
    base = tk.gpu_tiles(sms)
    if args.kind == "decode":
        tiles = [
            dataclasses.replace(base, decode_block_n=n, decode_num_warps=w, decode_num_stages=s)
            for n, w, s in itertools.product(args.block_n, args.warps, args.stages)
        ]
        tiles += [dataclasses.replace(base, target_programs=p * sms) for p in args.programs_per_sm]
    else:
        tiles = [
            dataclasses.replace(
                base, prefill_rows=r, prefill_block_n=n, prefill_num_warps=w, prefill_num_stages=s
            )
            for r, n, w, s in itertools.product(args.prefill_rows, args.block_n, args.warps, args.stages)
        ]
    return list(dict.fromkeys([base, *tiles]))


def swept(kind: str, tiles: tk.Tiles, sms: int) -> dict:
    """The fields a sweep of this kind varies."""
    if kind == "decode":
        return {
            "block_n": tiles.decode_block_n,
            "warps": tiles.decode_num_warps,
            "stages": tiles.decode_num_stages,
            "programs_per_sm": tiles.target_programs // sms,
        }
    return {
        "rows": tiles.prefill_rows,
        "block_n": tiles.prefill_block_n,
        "warps": tiles.prefill_num_warps,
        "stages": tiles.prefill_num_stages,
    }


def work(kind: str, shape: Shape) -> float:
    """Decode: KV bytes read; prefill: attention FLOPs (QK and PV over each visible pair)."""
    if kind == "decode":
        return shape.batch * shape.tokens * 2 * KV_HEADS * DIM * 2
    pairs = shape.tokens * shape.cached + shape.tokens * (shape.tokens + 1) / 2
    return shape.batch * 4 * HEADS * DIM * pairs


# ------------------------------------------------------------------ compiling and timing


def _compile(job: tuple[str, list[Shape], list[dict]]) -> int:
    """A worker: run each configuration once per shape (Triton compiles and caches)."""
    kind, shapes, tile_dicts = job
    device = torch.device("cuda")
    cases = [make_case(kind, shape, device) for shape in shapes]
    compiled = 0
    for tiles in tile_dicts:
        try:  # one that fails (out of shared memory, say) is skipped again when timed
            for case in cases:
                run(kind, case, tk.Tiles(**tiles))
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


def measure(args, grid_tiles: list[tk.Tiles], sms: int, bandwidth: float) -> list[dict]:
    device = torch.device("cuda")
    default = tk.gpu_tiles(sms)
    rows = []
    for shape in args.shapes:
        case = make_case(args.kind, shape, device)
        want = run(args.kind, case, default).float()
        for tiles in grid_tiles:
            try:
                err = ((run(args.kind, case, tiles).float() - want).norm() / want.norm()).item()
            except Exception:  # noqa: BLE001 - reported by the compile step
                continue
            us = graph_us(lambda c=case, t=tiles: run(args.kind, c, t))
            row = {**dataclasses.asdict(shape), **swept(args.kind, tiles, sms), "us": us}
            if args.kind == "decode":
                row["splits"] = tk.decode_splits(
                    shape.batch, KV_HEADS, case["tables"].shape[1] * BLOCK_SIZE, tiles
                )
                row["of_copy_bw"] = work("decode", shape) / (us / 1e6) / bandwidth
            else:
                row["TFLOP_s"] = work("prefill", shape) / (us / 1e6) / 1e12
            row |= {"rel_err_vs_default": err, "default": tiles == default}
            rows.append(row)
        del case
    return rows


def choose(args, rows: list[dict], grid_tiles: list[tk.Tiles], sms: int) -> tuple[tk.Tiles, dict]:
    """The tiles with the lowest geometric mean of time over each shape's best, and every tile's score."""
    ok = [r for r in rows if r["rel_err_vs_default"] < 1e-2]
    shape_of = [dataclasses.asdict(s) for s in args.shapes]
    best = [min(r["us"] for r in ok if all(r[k] == v for k, v in s.items())) for s in shape_of]
    scores = {}
    for tiles in grid_tiles:
        key = swept(args.kind, tiles, sms)
        mine = [r for r in ok if all(r[k] == v for k, v in key.items())]
        if len(mine) == len(shape_of):
            ratios = [r["us"] / best[shape_of.index({k: r[k] for k in shape_of[0]})] for r in mine]
            scores[tiles] = math.exp(statistics.fmean(math.log(x) for x in ratios))
    return min(scores, key=scores.get), scores


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    grid_tiles = grid(args, sms)
    chunks = [[dataclasses.asdict(t) for t in grid_tiles[i :: args.jobs]] for i in range(args.jobs)]
    with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, [(args.kind, args.shapes, chunk) for chunk in chunks]))
    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (graph_us(lambda s=src, d=dst: d.copy_(s), launches=5) / 1e6)
    del src, dst
    rows = measure(args, grid_tiles, sms, bandwidth)
    path = os.path.join(args.out, f"{args.kind}_sweep.json") if args.out else None
    report = {
        "device": torch.cuda.get_device_name(device),
        "copy_bandwidth_GBs": bandwidth / 1e9,
        "rows": rows,
    }
    if path:  # the measurements first: nothing below may lose them
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    chosen, scores = choose(args, rows, grid_tiles, sms)
    default = tk.gpu_tiles(sms)
    for shape in args.shapes:
        mine = sorted(
            (r for r in rows if all(r[k] == v for k, v in dataclasses.asdict(shape).items())),
            key=lambda r: r["us"],
        )
        print(f"\n### {args.kind} {shape}: fastest 6 of {len(mine)}, and the default")
        for r in mine[:6] + [r for r in mine if r["default"]]:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    print(f"\nchosen (geometric mean of time / best: {scores[chosen]:.3f}; default {scores.get(default)}):")
    print(dataclasses.asdict(chosen))
    report |= {
        "chosen": dataclasses.asdict(chosen),
        "chosen_score": scores[chosen],
        "default_score": scores.get(default),
    }
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, f"best_{args.kind}_tiles.json"), "w") as f:
            json.dump(dataclasses.asdict(chosen), f)


if __name__ == "__main__":
    main()
