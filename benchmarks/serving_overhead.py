"""CPU milliseconds per output token of each process of a served run: API server, engine, load client.

    python benchmarks/serving_overhead.py --concurrency 32 --num-prompts 64 --input-len 128 --output-len 64
    python benchmarks/serving_overhead.py --concurrency 32 -- --max-num-seqs 64     # extra `serve` args
    GOMP_SPINCOUNT=300000 python benchmarks/serving_overhead.py ...   # libgomp's spinning default, for A/B

Starts `duoserve serve` on a free loopback port, warms it up, then runs `duoserve bench` (random token-id
prompts, --ignore-eos) and reads each process's user + system CPU time (/proc/<pid>/stat for the API
server and its engine process, the client's rusage, which includes its ~seconds of start-up: use
enough requests) around the run. Output tokens are the server's
`duoserve:generation_tokens` counter. CPU time per token is what to compare on a shared machine (wall
time depends on what else runs); `--offline` adds the same workload through `LLM.generate` in this
process, the engine without any serving path.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import subprocess
import sys
import time
import urllib.request

_SERVE = "import sys; from duoserve.cli import main; sys.exit(main())"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15 of stat)


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def engine_pid(server_pid: int) -> int:
    """The server's engine process: its multiprocessing-spawned child (not the resource tracker)."""
    for child in children(server_pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return child
    raise RuntimeError(f"no engine process under {server_pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


def generation_tokens(base: str) -> float:
    for line in (get(f"{base}/metrics") or "").splitlines():
        if line.startswith("duoserve:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no duoserve:generation_tokens_total in /metrics")


def bench(base: str, args: argparse.Namespace, num_prompts: int, output_len: int) -> float:
    """Run `duoserve bench` to completion (its CPU time lands in this process's RUSAGE_CHILDREN); wall s."""
    cmd = [
        *(sys.executable, "-m", "duoserve.bench", "--base-url", base, "--disable-tqdm"),
        *("--dataset", "random", "--prompt-format", "token-ids", "--ignore-eos"),
        *("--random-input-len", str(args.input_len), "--random-output-len", str(output_len)),
        *("--num-prompts", str(num_prompts), "--max-concurrency", str(args.concurrency)),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"duoserve bench failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start


def served(args: argparse.Namespace) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", _SERVE, "serve", "--port", str(port), "--log-level", "WARNING"]
    server = subprocess.Popen([*cmd, *args.serve_args])
    try:
        deadline = time.monotonic() + args.startup_timeout
        while get(f"{base}/health") is None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(1)
        engine = engine_pid(server.pid)
        bench(base, args, args.concurrency, 4)  # warm-up: every batch size's first step
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        before = cpu_seconds(server.pid), cpu_seconds(engine), generation_tokens(base)
        wall = bench(base, args, args.num_prompts, args.output_len)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = cpu_seconds(server.pid), cpu_seconds(engine), generation_tokens(base)
    finally:
        server.terminate()
        server.wait(60)
    client = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    tokens = after[2] - before[2]
    print(
        f"served: concurrency {args.concurrency}, {args.num_prompts} requests of {args.input_len} -> "
        f"{args.output_len} tokens: {tokens:.0f} output tokens in {wall:.1f} s ({tokens / wall:.1f} tok/s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| process | CPU s | CPU ms per output token |")
    print("|---|---|---|")
    rows = [("API server", after[0] - before[0]), ("engine", after[1] - before[1]), ("bench client", client)]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / tokens * 1e3:.2f} |")


def offline(args: argparse.Namespace) -> None:
    from duoserve import LLM, SamplingParams

    llm = LLM(max_num_seqs=args.concurrency, max_num_batched_tokens=512)
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(args.input_len)]}
        for _ in range(args.num_prompts)
    ]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: args.concurrency], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    cpu, start = time.process_time(), time.perf_counter()
    outputs = llm.generate(prompts, params)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(
        f"offline (max_num_seqs {args.concurrency}, token budget 512 as the server's): {tokens} tokens in "
        f"{wall:.1f} s ({tokens / wall:.1f} tok/s), {cpu:.2f} CPU s = {cpu / tokens * 1e3:.2f} CPU ms "
        f"per output token, load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--offline", action="store_true", help="also run the workload offline (LLM.generate)")
    parser.add_argument("serve_args", nargs="*", help="after --: extra `duoserve serve` arguments")
    args = parser.parse_args()
    served(args)
    if args.offline:
        offline(args)


if __name__ == "__main__":
    main()
