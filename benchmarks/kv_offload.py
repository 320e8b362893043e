"""KV offload tiers (issue 14): TTFT of returning turns when conversation histories outgrow the KV pool.

    python benchmarks/kv_offload.py [--conversations 16 --concurrency 8 --turns 4 --input-len 200
                                     --output-len 32 --pressure 4] [--output r.json] [-- SERVER ARGS]
    python benchmarks/kv_offload.py --quick [--cases pressure/none,pressure/tier]   # a small smoke run
    python benchmarks/kv_offload.py --checksums      # speed of the checksums a block record could use
    python benchmarks/kv_offload.py --kv-cache-dtype int8   # int8 KV: blocks 4x smaller than float32

Each case is its own `duoserve serve` on 127.0.0.1 (started and stopped here; SERVER ARGS go to every
one, e.g. `-- --device cuda --kv-offload-cpu-bytes 8000000000`), driven by `duoserve bench --dataset
multi-turn` with the same seed, so every case sends the same conversations (greedy: the same answers):
  pressure/none   a KV pool of 1/--pressure of what the concurrent conversations' histories need
                  (4x: a returning turn waits behind the others while its history is evicted)
  pressure/tier   the same pool, with the offload tier (--kv-offload-dir, a fresh directory)
  fits/none       a pool holding every history (the tier never loads: its overhead alone; the
  fits/tier       issue's goal is under 3% slower)
  restart/none    a fresh server with no tier, sent the conversations again (cold)
  restart/tier    a fresh server over the directory pressure/tier filled, sent them again (warm)
Reported per case: TTFT p50/p99 of returning turns (turn >= 1), of first turns (turn 0: after a
restart, what the disk tier serves), output tokens/s, blocks stored into and loaded from the tiers, loads
(requests that loaded: with the admission that keeps a loaded request, at most one per returning turn),
preemptions, and the engine's offload and prefix-cache counters from /metrics. The issue's goal:
pressure/tier's returning-turn TTFT p50 >= 3x lower than pressure/none's.

--cases runs some of them (restart/tier runs pressure/tier first: it needs its directory); --repeats N runs
them in turn N times (a 3% difference is within one run's noise on a shared VM); --quick is a small
workload (4 conversations, 2 at a time, 3 turns of 64 + 8 tokens) for checking the script runs.

The pool is sized with --num-kv-blocks from the workload: concurrency x turns x (input + output) tokens
(a chat template adds a few) over --pressure, in blocks of --block-size; a lone conversation must fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from reliability import Server  # benchmarks/: a `duoserve serve` on 127.0.0.1, started and stopped


def offload_counters(server: Server) -> dict[str, float]:
    """The engine's counters: `duoserve:name{...tier="x"...}` as "name:x" (other labels dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("duoserve:").removesuffix("_total")
            wanted = name.startswith(("kv_offload_", "prefix_cache_", "num_preemptions")) or name in TIMELINE
            if wanted and "le" not in sample.labels:
                labels = [sample.labels[k] for k in ("tier", "reason") if k in sample.labels]
                found[":".join([name, *labels])] = sample.value
    return found


# Where a request's time goes (engine histograms, all turns): arrival -> admitted (for a returning turn
# that loads: room in the pool for its whole context), admitted -> first token (its load, the wait for the
# next step, its prefill).
TIMELINE = (
    "request_queue_time_seconds_sum",
    "request_queue_time_seconds_count",
    "request_prefill_time_seconds_sum",
    "request_prefill_time_seconds_count",
)


def bench(server: Server, args: argparse.Namespace, output: str) -> dict:
    command = [sys.executable, "-m", "duoserve.cli", "bench", "--base-url", server.url]
    command += ["--dataset", "multi-turn", "--num-prompts", str(args.conversations)]
    command += ["--multi-turn-turns", str(args.turns), "--concurrency", str(args.concurrency)]
    command += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    command += ["--ignore-eos", "--seed", str(args.seed), "--disable-tqdm", "--output", output]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(output, encoding="utf-8") as f:
        return json.load(f)


def ttft_ms(requests: list[dict], turns: str) -> dict[str, float | None]:
    values = [
        r["ttft"] * 1000
        for r in requests
        if r["error"] is None and r["ttft"] is not None and (r["turn"] >= 1) == (turns == "returning")
    ]
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    return {
        "n": len(values),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
    }


def run_case(name: str, server_args: list[str], args: argparse.Namespace, workdir: str) -> dict:
    server = Server(["serve", *server_args], os.path.join(workdir, name.replace("/", "-") + ".log"))
    server.start(timeout=600.0)
    try:
        result = bench(server, args, os.path.join(workdir, name.replace("/", "-") + ".json"))
        counters = offload_counters(server)
    finally:
        server.stop()
    requests = result["requests"]
    row = {
        "case": name,
        "returning_ttft_ms": ttft_ms(requests, "returning"),
        "first_ttft_ms": ttft_ms(requests, "first"),
        "output_tokens_per_s": result["summary"]["output_throughput"],
        "failed": result["summary"]["failed"],
        "counters": counters,
    }
    print(json.dumps(row), flush=True)
    return row


def pool_blocks(args: argparse.Namespace, pressure: float) -> int:
    history = args.turns * (args.input_len + args.output_len) * 1.1  # a chat template's few tokens more
    needed = args.concurrency * history / pressure
    lone = history + args.output_len  # a conversation's last turn must fit on its own
    return math.ceil(max(needed, lone) / args.block_size)


CASES = ("pressure/none", "pressure/tier", "fits/none", "fits/tier", "restart/none", "restart/tier")


def run_all(args: argparse.Namespace, server_args: list[str]) -> list[dict]:
    common = ["--block-size", str(args.block_size), "--kv-cache-dtype", args.kv_cache_dtype, *server_args]
    cases = [c for c in CASES if c in args.cases]
    if "restart/tier" in cases and "pressure/tier" not in cases:
        cases.insert(0, "pressure/tier")  # it fills the directory the restart starts from
    rows = []
    with tempfile.TemporaryDirectory(prefix="duoserve-kv-offload-") as workdir:
        pressure = ["--num-kv-blocks", str(pool_blocks(args, args.pressure)), *common]
        fits = ["--num-kv-blocks", str(pool_blocks(args, 1 / 1.5)), *common]
        for repeat in range(args.repeats):  # the cases in turn, again: the VM's drift hits them alike
            tier_dir = os.path.join(workdir, f"tier{repeat}")  # each repeat's own, fresh
            arguments = {
                "pressure/none": pressure,
                "pressure/tier": [*pressure, "--kv-offload-dir", tier_dir],
                "fits/none": fits,
                "fits/tier": [*fits, "--kv-offload-dir", os.path.join(workdir, f"fits{repeat}")],
                # The restarts: the same conversations again, on a fresh server; the tier: pressure/tier's.
                "restart/none": pressure,
                "restart/tier": [*pressure, "--kv-offload-dir", tier_dir],
            }
            for case in cases:
                rows.append(run_case(case, arguments[case], args, workdir) | {"repeat": repeat})
    return rows


def tier_sum(counters: dict[str, float], name: str) -> int:
    """A counter summed over the tiers ("kv_offload_stores:cpu" + "kv_offload_stores:disk")."""
    return int(sum(v for k, v in counters.items() if k.split(":")[0] == name))


def print_table(rows: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def mean_ms(counters: dict[str, float], name: str) -> str:
        count = counters.get(f"{name}_count", 0)
        return ms(1000 * counters[f"{name}_sum"] / count if count else None)

    header = ("case", "returning p50", "p99", "first p50", "p99", "out tok/s", "stored", "loaded", "loads")
    header += ("load s", "queue", "to 1st tok")
    print(
        "\n{:<15} {:>14} {:>8} {:>10} {:>8} {:>10} {:>7} {:>7} {:>6} {:>7} {:>7} {:>10}  preemptions".format(
            *header
        )
    )
    for row in rows:
        back, first, counters = row["returning_ttft_ms"], row["first_ttft_ms"], row["counters"]
        stored, loaded = tier_sum(counters, "kv_offload_stores"), tier_sum(counters, "kv_offload_hits")
        loads = int(counters.get("kv_offload_loads", 0))
        load_seconds = sum(v for k, v in counters.items() if k.startswith("kv_offload_load_seconds_sum"))
        preemptions = int(counters.get("num_preemptions", 0))
        print(
            f"{row['case']:<15} {ms(back['p50']):>14} {ms(back['p99']):>8} {ms(first['p50']):>10} "
            f"{ms(first['p99']):>8} {row['output_tokens_per_s']:>10.1f} {stored:>7} {loaded:>7} {loads:>6} "
            f"{load_seconds:>7.2f} {mean_ms(counters, 'request_queue_time_seconds'):>7} "
            f"{mean_ms(counters, 'request_prefill_time_seconds'):>10}  {preemptions}"
        )
    print(
        "(load s: the loads' seconds from blocks allocated to KV in place, summed; queue / to 1st tok: mean "
        "ms of every request from arrival to admission, and from admission to its first token)"
    )
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)

    def median(case: str, *path: str) -> float | None:
        """The median over the case's repeats of row[path[0]][path[1]]... (None if any is missing)."""
        values = []
        for row in by_case[case]:
            for key in path:
                row = row[key]
            values.append(row)
        return None if None in values else float(np.median(values))

    repeats = f" (median of {len(by_case[rows[0]['case']])} runs each)" if len(rows) > len(by_case) else ""
    if "pressure/none" in by_case and "pressure/tier" in by_case:
        none = median("pressure/none", "returning_ttft_ms", "p50")
        tier = median("pressure/tier", "returning_ttft_ms", "p50")
        if none and tier:
            print(
                f"\nreturning turns under pressure: TTFT p50 {none / tier:.2f}x lower with the tier "
                f"(goal >= 3x){repeats}"
            )
    if "fits/none" in by_case and "fits/tier" in by_case:
        none, tier = median("fits/none", "output_tokens_per_s"), median("fits/tier", "output_tokens_per_s")
        if none:
            print(
                f"no pressure: output tokens/s {100 * (tier / none - 1):+.1f}% with the tier (goal > -3%)"
                f"{repeats}"
            )
    if "restart/none" in by_case and "restart/tier" in by_case:
        none = median("restart/none", "first_ttft_ms", "p50")
        tier = median("restart/tier", "first_ttft_ms", "p50")
        if none and tier:
            print(
                f"after a restart: first-turn TTFT p50 {none / tier:.2f}x lower with the disk tier{repeats}"
            )


def measure_checksums(megabytes: int = 64, repeats: int = 5) -> dict[str, float]:
    """GB/s of each checksum a block record could carry, over 1 MiB blocks (best of `repeats`)."""
    import hashlib
    import zlib

    import xxhash

    block = os.urandom(1 << 20)
    candidates = {
        "xxhash.xxh3_64": lambda data: xxhash.xxh3_64_intdigest(data),  # the record's (record.py)
        "xxhash.xxh64": lambda data: xxhash.xxh64_intdigest(data),
        "zlib.crc32": lambda data: zlib.crc32(data),
        "zlib.adler32": lambda data: zlib.adler32(data),
        "hashlib.blake2b": lambda data: hashlib.blake2b(data, digest_size=16).digest(),
        "hashlib.sha1": lambda data: hashlib.sha1(data, usedforsecurity=False).digest(),
        "hashlib.md5": lambda data: hashlib.md5(data, usedforsecurity=False).digest(),
        "hashlib.sha256": lambda data: hashlib.sha256(data).digest(),
    }
    speeds = {}
    for name, function in candidates.items():
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(megabytes):
                function(block)
            best = min(best, time.perf_counter() - start)
        speeds[name] = megabytes * (1 << 20) / best / 1e9
        print(f"{name:<16} {speeds[name]:6.2f} GB/s", flush=True)
    return speeds


def main() -> None:
    argv = sys.argv[1:]
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checksums", action="store_true", help="only measure the checksums' speed")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight at once")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=200, help="tokens of each user turn")
    parser.add_argument("--output-len", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--pressure", type=float, default=4.0, help="histories in flight / KV pool")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="the servers' --kv-cache-dtype (auto: the model's dtype; int8: blocks 4x smaller than float32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the cases in turn this many times (summaries: medians)"
    )
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="a small workload: checks the script runs")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}: choose among {', '.join(CASES)}")
    if args.quick:
        args.conversations, args.concurrency, args.turns, args.input_len, args.output_len = 4, 2, 3, 64, 8
    if args.checksums:
        measure_checksums()
        return
    rows = run_all(args, server_args)
    print_table(rows)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "server_args": server_args, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
