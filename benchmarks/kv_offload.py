"""KV offload tiers (issue 14): TTFT of returning turns when conversation histories outgrow the KV pool.

    python benchmarks/kv_offload.py [--conversations 16 --concurrency 8 --turns 4 --input-len 200
                                     --output-len 32 --pressure 4] [--output r.json] [-- SERVER ARGS]
    python benchmarks/kv_offload.py --checksums      # speed of the stdlib checksums a block record could use

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
restart, what the disk tier serves), output tokens/s, and the engine's offload and prefix-cache counters
from /metrics. The issue's goal: pressure/tier's returning-turn TTFT p50 >= 3x lower than pressure/none's.

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
            name = sample.name.removeprefix("duoserve:")
            if name.startswith(("kv_offload_", "prefix_cache_")) and "le" not in sample.labels:
                labels = [sample.labels[k] for k in ("tier", "reason") if k in sample.labels]
                found[":".join([name, *labels])] = sample.value
    return found


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


def run_all(args: argparse.Namespace, server_args: list[str]) -> list[dict]:
    common = ["--block-size", str(args.block_size), *server_args]
    rows = []
    with tempfile.TemporaryDirectory(prefix="duoserve-kv-offload-") as workdir:
        tier_dir = os.path.join(workdir, "tier")
        pressure = ["--num-kv-blocks", str(pool_blocks(args, args.pressure)), *common]
        fits = ["--num-kv-blocks", str(pool_blocks(args, 1 / 1.5)), *common]
        rows.append(run_case("pressure/none", pressure, args, workdir))
        rows.append(run_case("pressure/tier", [*pressure, "--kv-offload-dir", tier_dir], args, workdir))
        rows.append(run_case("fits/none", fits, args, workdir))
        rows.append(
            run_case("fits/tier", [*fits, "--kv-offload-dir", os.path.join(workdir, "fits")], args, workdir)
        )
        # The restarts: the same conversations again, on a fresh server; the tier's from pressure/tier.
        rows.append(run_case("restart/none", pressure, args, workdir))
        rows.append(run_case("restart/tier", [*pressure, "--kv-offload-dir", tier_dir], args, workdir))
    return rows


def print_table(rows: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    header = ("case", "returning p50", "p99", "first p50", "p99", "out tok/s")
    print("\n{:<15} {:>14} {:>8} {:>10} {:>8} {:>10}  hits".format(*header))
    for row in rows:
        back, first = row["returning_ttft_ms"], row["first_ttft_ms"]
        hits = {k: v for k, v in row["counters"].items() if k.startswith("kv_offload_hits:")}
        print(
            f"{row['case']:<15} {ms(back['p50']):>14} {ms(back['p99']):>8} {ms(first['p50']):>10} "
            f"{ms(first['p99']):>8} {row['output_tokens_per_s']:>10.1f}  {hits}"
        )
    by_case = {row["case"]: row for row in rows}
    none, tier = (
        by_case["pressure/none"]["returning_ttft_ms"]["p50"],
        by_case["pressure/tier"]["returning_ttft_ms"]["p50"],
    )
    if none and tier:
        print(
            f"\nreturning turns under pressure: TTFT p50 {none / tier:.2f}x lower with the tier (goal >= 3x)"
        )
    none, tier = by_case["fits/none"]["output_tokens_per_s"], by_case["fits/tier"]["output_tokens_per_s"]
    if none:
        print(f"no pressure: output tokens/s {100 * (tier / none - 1):+.1f}% with the tier (goal > -3%)")


def measure_checksums(megabytes: int = 64, repeats: int = 5) -> dict[str, float]:
    """GB/s of each stdlib checksum a block record could carry, over 1 MiB blocks (best of `repeats`)."""
    import hashlib
    import zlib

    block = os.urandom(1 << 20)
    candidates = {
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args(argv)
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
