"""KV offload tiers (issue 14): TTFT of returning turns when conversation histories outgrow the KV pool.

    python benchmarks/kv_offload.py [--conversations 12 --concurrency 2 --turns 6 --input-len 128
                                     --output-len 16 --pressure 4] [--output r.json] [-- SERVER ARGS]
    python benchmarks/kv_offload.py --cases evicted/none,evicted/tier   # the issue's goal
    python benchmarks/kv_offload.py --quick [--cases evicted/none,evicted/tier]   # a small smoke run
    python benchmarks/kv_offload.py --checksums      # speed of the checksums a block record could use
    python benchmarks/kv_offload.py --kv-cache-dtype int8   # int8 KV: blocks 4x smaller than float32

Each case is its own `duoserve serve` on 127.0.0.1 (started and stopped here; SERVER ARGS go to every
one, e.g. `-- --device cuda --kv-offload-cpu-bytes 8000000000`), driven by `duoserve bench --dataset
multi-turn` with the same seed, so every case sends the same conversations (greedy: the same answers):
  evicted/none    many users whose histories together are --pressure x the pool, while the requests in
                  flight fit it (the pool holds 1.5 x --concurrency full histories). Driven with
                  --max-active-conversations = every conversation: each turn takes a request slot only
                  while it runs, so the conversations take turns round-robin and a returning turn finds
                  its history evicted by the others' turns (vLLM's benchmarks/multi_turn, LMCache's
                  multi-round QA). Without a tier it is computed again.
  evicted/tier    the same, with the offload tier (--kv-offload-dir, a fresh directory): it is loaded.
  pressure/none   in-flight histories --pressure x the pool: queueing. A conversation holds its slot
                  across its turns and the pool is 1/--pressure of what the concurrent conversations'
                  histories need (but holds one; the ratio is printed), so a returning turn mostly waits
                  for room, with or without the tier.
  pressure/tier   the same pool, with the offload tier
  fits/none       a pool holding every history (the tier never loads: its overhead alone; the
  fits/tier       issue's goal is under 3% slower)
  restart/none    a fresh server with no tier, sent the conversations again (cold)
  restart/tier    a fresh server over the directory pressure/tier filled, sent them again (warm)
Why evicted/*: the issue asks for ">= 3x lower TTFT p50 on turns whose history was evicted", and
pressure/* measures queueing for a too-small pool instead (AMD Zen 5, 2 vCPUs, 8 conversations, 4 at a
time, 4 turns of 128 + 16 tokens: returning-turn TTFT p50 2.3-2.6 s without the tier, 2.1-2.3 s with it,
of which ~1.1-1.25 s was queue time in both; admission to first token 880-920 ms vs 470-500 ms).

Reported per case: TTFT p50/p99 of returning turns (turn >= 1), of first turns (turn 0: after a
restart, what the disk tier serves), output tokens/s, blocks stored into and loaded from the tiers, loads
(requests that loaded: with the admission that keeps a loaded request, at most one per returning turn),
preemptions, and the engine's offload and prefix-cache counters from /metrics. For the evicted/* pair also
the returning turns that missed the pool (the server's usage.prompt_tokens_details.cached_tokens: its
prefix cache served under half of the turn's history, i.e. the previous turn's prompt and answer), their
TTFT p50/p99, each returning turn's TTFT p50, and a check that they missed the pool and hit the tier. The
issue's goal: evicted/tier's TTFT p50 over the returning turns that missed the pool >= 3x lower than
evicted/none's.

--cases runs some of them (restart/tier runs pressure/tier first: it needs its directory); --repeats N runs
them in turn N times (a 3% difference is within one run's noise on a shared VM); --quick is a small
workload (12 conversations, 2 at a time, 3 turns of 64 + 8 tokens) for checking the script runs.

The pools are sized with --num-kv-blocks from the workload, in blocks of --block-size, from a full history
of turns x (input + output) tokens (a prompt format adds a few); a lone conversation must always fit:
  pressure/*  --concurrency histories over --pressure
  evicted/*   the larger of 1.5 x --concurrency histories (the requests in flight, with a margin) and
              --conversations histories over --pressure. The defaults make both 3 histories; with fewer
              conversations than 1.5 x concurrency x pressure the histories outgrow the pool less (printed).
  fits/*      every in-flight history, 1.5x over
With round-robin turns, turn k of a conversation comes after the other conversations' turns k-1 or k: it
misses the pool if their contexts (about conversations x k x (input + output)) exceed it. At the defaults
(a pool of 3 histories, ~20 turns of context; 12 conversations) turn 1 mostly finds its history (8 of 12
in a run) and turns 2-5 find none of it. The defaults' full history (6 x 144 tokens) is about the earlier
default's (4 x 232); more, shorter turns give more returning turns per run and keep decode time, which
no tier changes, small. Depth matters: a recompute grows with the history, a load hardly at all (one run,
busy shared machine, TTFT p50 by returning turn 1-5 without the tier 496/847/1517/1710/1703 ms, with it
253/357/210/217/238 ms). A case takes ~1 minute on 2 vCPUs (Zen 5).

Where a returning turn's TTFT goes with the tier (SmolLM2-135M Q4_1, 2 vCPUs; the engine's own timeline
of one run, medians over the 52 turns that loaded): the load's read 3 ms on the I/O thread (27 blocks,
page cache), its copy into the cache 2 ms; the turn's ~134 new tokens (its user message and template,
and ~4 tokens of the history's last partial block) prefilled in one step: 90-320 ms as other work on the
machine comes and goes, nearly all of the TTFT and what a prefix-cache hit pays too; ~40 ms outside the
engine (HTTP, chat template, tokenizing, streaming back). The two turns in flight finish together, so the
next two arrive together and one of them waits for the other's prefill step first: TTFT is bimodal
(~1x and ~2x a prefill step), and the p50 falls between the two. Until the connector waited briefly for
loads (duoserve/kv/offload/connector.py, SYNC_LOAD_SECONDS), a load also cost its request the step it was
admitted in (~40 ms median: the other request's decode step, or its ~300 ms prefill step, or a 10 ms
tick), the kv_offload_load_seconds of ~30-85 ms: the request ran only in the next step. The ratio below
swings with the machine's load (2 vCPUs shared with other jobs; runs of 2026-12-04): without the wait
2.29x, 1.80x, 2.43x, 2.74x; with it 5.53x, 2.93x, 2.19x, 4.69x.
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


def bench(server: Server, args: argparse.Namespace, output: str, round_robin: bool) -> dict:
    """`duoserve bench` over the multi-turn dataset; `round_robin`: every conversation active at once,
    each turn holding one of --concurrency request slots only while it runs."""
    command = [sys.executable, "-m", "duoserve.cli", "bench", "--base-url", server.url]
    command += ["--dataset", "multi-turn", "--num-prompts", str(args.conversations)]
    command += ["--multi-turn-turns", str(args.turns), "--concurrency", str(args.concurrency)]
    if round_robin:
        command += ["--max-active-conversations", str(args.conversations)]
    command += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    command += ["--ignore-eos", "--seed", str(args.seed), "--disable-tqdm", "--output", output]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(output, encoding="utf-8") as f:
        return json.load(f)


def ttft_ms(requests: list[dict]) -> dict[str, float | None]:
    """TTFT p50/p99 in ms over the requests that succeeded."""
    values = [r["ttft"] * 1000 for r in requests if r["error"] is None and r["ttft"] is not None]
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    return {
        "n": len(values),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
    }


def missed_pool(requests: list[dict]) -> list[dict] | None:
    """The returning turns whose history the pool had lost: the server's prefix cache served under half
    of it (the previous turn's prompt and answer; its cached_tokens count only the pool, not a tier).
    None when the server reports no cached tokens."""
    by_turn = {(r["conv_id"], r["turn"]): r for r in requests}
    missed = []
    for r in requests:
        before = by_turn.get((r["conv_id"], r["turn"] - 1))
        if r["turn"] < 1 or before is None:
            continue
        if r.get("cached_tokens") is None or before.get("prompt_tokens") is None:
            return None
        if r["cached_tokens"] < (before["prompt_tokens"] + before["output_tokens"]) / 2:
            missed.append(r)
    return missed


def turn_ttft_p50(requests: list[dict]) -> dict[int, float | None]:
    """Each returning turn's TTFT p50 (ms): a history k turns long costs a recompute ~k turns of prefill."""
    turns = sorted({r["turn"] for r in requests if r["turn"] >= 1})
    return {k: ttft_ms([r for r in requests if r["turn"] == k])["p50"] for k in turns}


def run_case(name: str, server_args: list[str], args: argparse.Namespace, workdir: str) -> dict:
    server = Server(["serve", *server_args], os.path.join(workdir, name.replace("/", "-") + ".log"))
    server.start(timeout=600.0)
    round_robin = name.startswith("evicted/")
    try:
        output = os.path.join(workdir, name.replace("/", "-") + ".json")
        result = bench(server, args, output, round_robin)
        counters = offload_counters(server)
    finally:
        server.stop()
    requests = result["requests"]
    row = {
        "case": name,
        "returning_ttft_ms": ttft_ms([r for r in requests if r["turn"] >= 1]),
        "first_ttft_ms": ttft_ms([r for r in requests if r["turn"] == 0]),
        "output_tokens_per_s": result["summary"]["output_throughput"],
        "failed": result["summary"]["failed"],
        "counters": counters,
    }
    if round_robin:
        missed = missed_pool(requests)
        row["missed_pool_ttft_ms"] = None if missed is None else ttft_ms(missed)
        row["turn_ttft_p50_ms"] = turn_ttft_p50(requests)
    print(json.dumps(row), flush=True)
    return row


def history_tokens(args: argparse.Namespace) -> float:
    """A conversation's full history: every turn and answer (a prompt format adds a few tokens)."""
    return args.turns * (args.input_len + args.output_len) * 1.1


def pool_blocks(args: argparse.Namespace, pressure: float) -> int:
    """A pool of --concurrency histories over `pressure` (a lone conversation always fits)."""
    history = history_tokens(args)
    needed = args.concurrency * history / pressure
    lone = history + args.output_len  # a conversation's last turn must fit on its own
    return math.ceil(max(needed, lone) / args.block_size)


# The in-flight requests' share of the evicted/* pool: what they hold at most, with room for the blocks a
# finished turn leaves in the prefix cache while the next one is admitted.
IN_FLIGHT_MARGIN = 1.5


def evicted_pool_blocks(args: argparse.Namespace) -> int:
    """The evicted/* pool: the requests in flight fit (with a margin); every history, --pressure x over."""
    history = history_tokens(args)
    in_flight = IN_FLIGHT_MARGIN * args.concurrency * history
    everyone = args.conversations * history / args.pressure
    return math.ceil(max(in_flight, everyone, history + args.output_len) / args.block_size)


def describe_pools(args: argparse.Namespace, cases: list[str]) -> None:
    """How far the histories outgrow each pool, as sized (a lone conversation always fits)."""
    history, block_tokens = history_tokens(args), args.block_size
    if any(c.startswith(("pressure/", "restart/")) for c in cases):
        blocks = pool_blocks(args, args.pressure)
        ratio = args.concurrency * history / (blocks * block_tokens)
        print(
            f"pressure/*: a pool of {blocks} blocks; the in-flight histories are {ratio:.2f}x it", flush=True
        )
    if any(c.startswith("evicted/") for c in cases):
        blocks = evicted_pool_blocks(args)
        ratio = args.conversations * history / (blocks * block_tokens)
        print(
            f"evicted/*: a pool of {blocks} blocks; {args.conversations} conversations' histories are "
            f"{ratio:.2f}x it; {args.concurrency} turns in flight, all conversations active",
            flush=True,
        )
        if ratio < args.pressure * 0.99:
            wanted = math.ceil(IN_FLIGHT_MARGIN * args.concurrency * args.pressure)
            print(f"  (under --pressure {args.pressure:g}: --conversations {wanted} gives it)", flush=True)


CASES = (
    "evicted/none",
    "evicted/tier",
    "pressure/none",
    "pressure/tier",
    "fits/none",
    "fits/tier",
    "restart/none",
    "restart/tier",
)


def run_all(args: argparse.Namespace, server_args: list[str]) -> list[dict]:
    common = ["--block-size", str(args.block_size), "--kv-cache-dtype", args.kv_cache_dtype, *server_args]
    cases = [c for c in CASES if c in args.cases]
    if "restart/tier" in cases and "pressure/tier" not in cases:
        cases.insert(0, "pressure/tier")  # it fills the directory the restart starts from
    rows = []
    with tempfile.TemporaryDirectory(prefix="duoserve-kv-offload-") as workdir:
        pressure = ["--num-kv-blocks", str(pool_blocks(args, args.pressure)), *common]
        fits = ["--num-kv-blocks", str(pool_blocks(args, 1 / 1.5)), *common]
        evicted = ["--num-kv-blocks", str(evicted_pool_blocks(args)), *common]
        describe_pools(args, cases)
        for repeat in range(args.repeats):  # the cases in turn, again: the VM's drift hits them alike
            tier_dir = os.path.join(workdir, f"tier{repeat}")  # each repeat's own, fresh
            arguments = {
                "evicted/none": evicted,
                "evicted/tier": [*evicted, "--kv-offload-dir", os.path.join(workdir, f"evicted{repeat}")],
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
    print_evicted_checks(rows)
    print_goals(rows)


def median_of(rows: list[dict], *path: str | int) -> float | None:
    """The median over `rows` of row[path[0]][path[1]]... (None if any is missing)."""
    values = []
    for row in rows:
        for key in path:
            row = None if row is None else row.get(key)
        values.append(row)
    return None if not values or None in values else float(np.median(values))


def print_evicted_checks(rows: list[dict]) -> None:
    """Whether the evicted/* returning turns missed the pool, and with the tier loaded: from the server's
    cached tokens per request and its /metrics counters."""
    for row in rows:
        if not row["case"].startswith("evicted/"):
            continue
        counters, missed = row["counters"], row["missed_pool_ttft_ms"]
        hits, queries = counters.get("prefix_cache_hits", 0), counters.get("prefix_cache_queries", 0)
        line = f"{row['case']} (run {row.get('repeat', 0) + 1}): "
        if missed is None:
            line += "the server reports no cached tokens: which returning turns missed the pool is unknown"
        else:
            line += f"{missed['n']} of {row['returning_ttft_ms']['n']} returning turns missed the pool (TTFT "
            line += f"p50 {missed['p50'] or 0:.0f} ms, p99 {missed['p99'] or 0:.0f} ms)"
        line += f"; prefix cache hits {hits:.0f} of {queries:.0f} tokens"
        if row["case"] == "evicted/tier":
            line += (
                f"; the tier loaded for {counters.get('kv_offload_loads', 0):.0f} requests "
                f"({tier_sum(counters, 'kv_offload_hits')} blocks, "
                f"{counters.get('kv_offload_loads_declined', 0):.0f} declined as dearer than computing)"
            )
        line += f"; {counters.get('num_preemptions', 0):.0f} preemptions"
        turns = "  ".join(
            f"{k}: {'-' if v is None else f'{v:.0f}'}" for k, v in row["turn_ttft_p50_ms"].items()
        )
        print(f"{line}\n  TTFT p50 (ms) by returning turn  {turns}")


def print_goals(rows: list[dict]) -> None:
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)

    def ratio(path: tuple[str, ...], none_case: str, tier_case: str) -> float | None:
        if none_case not in by_case or tier_case not in by_case:
            return None
        none, tier = median_of(by_case[none_case], *path), median_of(by_case[tier_case], *path)
        return none / tier if none and tier else None

    repeats = f" (median of {len(by_case[rows[0]['case']])} runs each)" if len(rows) > len(by_case) else ""
    missed = ratio(("missed_pool_ttft_ms", "p50"), "evicted/none", "evicted/tier")
    returning = ratio(("returning_ttft_ms", "p50"), "evicted/none", "evicted/tier")
    if missed is not None:
        print(
            f"\nreturning turns whose history was evicted (evicted/*): TTFT p50 {missed:.2f}x lower with "
            f"the tier (goal >= 3x); all returning turns {returning or 0:.2f}x{repeats}"
        )
    queued = ratio(("returning_ttft_ms", "p50"), "pressure/none", "pressure/tier")
    if queued is not None:
        print(
            "in-flight histories over the pool (pressure/*: queueing, not the goal's case): "
            f"returning-turn TTFT p50 {queued:.2f}x lower with the tier{repeats}"
        )
    fits = ratio(("output_tokens_per_s",), "fits/tier", "fits/none")
    if fits is not None:
        print(f"no pressure: output tokens/s {100 * (fits - 1):+.1f}% with the tier (goal > -3%){repeats}")
    restart = ratio(("first_ttft_ms", "p50"), "restart/none", "restart/tier")
    if restart is not None:
        print(f"after a restart: first-turn TTFT p50 {restart:.2f}x lower with the disk tier{repeats}")


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
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="requests in flight at once (pressure/, fits/, restart/: conversations, holding their slot)",
    )
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--input-len", type=int, default=128, help="tokens of each user turn")
    parser.add_argument("--output-len", type=int, default=16, help="tokens of each answer")
    parser.add_argument(
        "--pressure",
        type=float,
        default=4.0,
        help="KV pool: pressure/* histories in flight / pool; evicted/* every history / pool",
    )
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
        args.conversations, args.concurrency, args.turns, args.input_len, args.output_len = 12, 2, 3, 64, 8
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
