"""Issue 10's table for this host's CPU kind, in one command: each goal at default arguments, side by side
with what a user would pick instead, and the CPU it was measured on.

    PYTHONPATH=. python benchmarks/cpu_table.py --llama-server PATH [--out DIR]

The sessions' machines are drawn by chance (AMX Xeons, AVX2-only Zen 3, AVX512-BF16 Zen 5): a session that
lands on a CPU kind the tables lack runs this once, with nothing else running, and has the whole row
(about 10 minutes on 2 cores). One after the other:

1. `benchmarks/serve_vs_llama_server.sh` at concurrency 1 and 32 (the default GGUF on both servers, 256
   random tokens in, 128 out, greedy): c=1 TPOT p50 (goal: at most llama-server's) and c=32 output tok/s
   (goal: at least 3x llama-server's);
2. `benchmarks/throughput.py --num-requests 64 --hf-sample 1 --hf-dtypes float32`: offline output tok/s of
   `LLM.generate` against transformers `generate` in float32 (goal: at least 5x);
3. `benchmarks/memory.py` on the default model and on a 1B-shape random Q4_K GGUF written by
   `benchmarks/make_gguf.py`: what loading added to resident memory, the KV cache apart, against the file
   (goal for the 1B: at most 1.3x).

Prints the CPU (lscpu's model name, family and model, the flags the host table reads) and `duoserve env`'s
host line, then a markdown table with each goal's status; DIR keeps every run's output and cpu_table.json.

`--as-isa avx2` (or avx512, generic) runs everything as a lesser x86 level: duoserve's table row and C++
kernels (DUOSERVE_CPU_ISA, duoserve/cpu_kernels.py), torch's own kernels (ATEN_CPU_CAPABILITY), oneDNN and
MKL, for duoserve and transformers alike; give it a llama-server built for the same level (GGML_NATIVE=OFF,
GGML_AVX2=ON, GGML_AVX512=OFF). It shows the code paths of that CPU kind on this one's cores: an estimate
of its row, not a measurement of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512vbmi", "amx_bf16", "amx_tile")
# --as-isa LEVEL: what each library reads to stay at that level.
AS_ISA = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "generic": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> str:
    """Run a step, keep its output in `log`, and return it (a failed step stops the table)."""
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed ({result.returncode}); see {log}")
    return result.stdout


def cpu() -> dict[str, str]:
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("Flags", "").split())
    return {
        "model": fields.get("Model name", "?"),
        "family/model": f"{fields.get('CPU family', '?')}/{fields.get('Model', '?')}",
        "cpus": fields.get("CPU(s)", "?"),
        "flags": " ".join(f for f in FLAGS if f in flags) or "none of " + ",".join(FLAGS),
    }


def serve(out: Path, llama_server: str) -> dict[str, float]:
    env = os.environ | {"CONCURRENCIES": "1 32", "LLAMA_SERVER": llama_server}
    run(["bash", str(BENCHMARKS / "serve_vs_llama_server.sh"), str(out / "serve")], out / "serve.log", env)

    def summary(label: str, concurrency: int) -> dict:
        return json.loads((out / "serve" / f"{label}-c{concurrency}.json").read_text())["summary"]

    return {
        "c1_tpot_ms": summary("duoserve", 1)["median_tpot_ms"],
        "c1_tpot_ms_llama": summary("llama-server", 1)["median_tpot_ms"],
        "c32_tok_s": summary("duoserve", 32)["output_throughput"],
        "c32_tok_s_llama": summary("llama-server", 32)["output_throughput"],
    }


def offline(out: Path) -> dict[str, float]:
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--num-requests", "64", "--hf-sample", "1"]
    text = run([*command, "--hf-dtypes", "float32"], out / "throughput.log")
    ours = re.search(r"duoserve LLM\.generate .*?: [\d.]+ s, ([\d.]+) output tok/s", text)
    theirs = re.search(r"transformers generate float32 .*?: [\d.]+ s, ([\d.]+) output tok/s", text)
    if ours is None or theirs is None:
        sys.exit(f"throughput.py printed no rates; see {out / 'throughput.log'}")
    return {"offline_tok_s": float(ours[1]), "offline_tok_s_transformers": float(theirs[1])}


def memory(out: Path) -> dict[str, float]:
    from duoserve.models.loader import default_model_path

    q4k = out / "llama-1b-q4_k.gguf"
    if not q4k.exists():
        run([sys.executable, str(BENCHMARKS / "make_gguf.py"), str(q4k)], out / "make_gguf.log")
    found = {}
    for name, path in (("default", default_model_path()), ("1b_q4_k", str(q4k))):
        text = run([sys.executable, str(BENCHMARKS / "memory.py"), path], out / f"memory-{name}.log")
        match = re.search(r"load added (\d+) MiB more: ([\d.]+)x file", text)
        if match is None:
            sys.exit(f"memory.py printed no figure; see {out / f'memory-{name}.log'}")
        found[f"memory_{name}_x_file"] = float(match[2])
    return found


def table(figures: dict[str, float]) -> str:
    f = figures
    rows = [
        (
            "c=1 TPOT p50",
            f"{f['c1_tpot_ms']:.2f} ms",
            f"llama-server {f['c1_tpot_ms_llama']:.2f} ms",
            f["c1_tpot_ms_llama"] / f["c1_tpot_ms"],
            "≥ 1x (TPOT ≤ llama-server's)",
            1.0,
        ),
        (
            "c=32 output tok/s",
            f"{f['c32_tok_s']:.1f}",
            f"llama-server {f['c32_tok_s_llama']:.1f}",
            f["c32_tok_s"] / f["c32_tok_s_llama"],
            "≥ 3x",
            3.0,
        ),
        (
            "offline tok/s (64 requests)",
            f"{f['offline_tok_s']:.1f}",
            f"transformers fp32 {f['offline_tok_s_transformers']:.1f}",
            f["offline_tok_s"] / f["offline_tok_s_transformers"],
            "≥ 5x",
            5.0,
        ),
        (
            "memory after load, 1B Q4_K",
            f"{f['memory_1b_q4_k_x_file']:.2f}x the file",
            f"default model {f['memory_default_x_file']:.2f}x",
            None,
            "≤ 1.3x",
            None,
        ),
    ]
    lines = [
        "| at default arguments | duoserve | peer | ratio (higher is better) | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, ours, peer, ratio, goal, needed in rows:
        met = f["memory_1b_q4_k_x_file"] <= 1.3 if needed is None else ratio >= needed
        shown = "" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {name} | {ours} | {peer} | {shown} | {goal} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-server", required=True, help="the llama-server binary (../shared/peers)")
    parser.add_argument("--out", default="bench_results/cpu_table", help="folder for every run's output")
    parser.add_argument("--as-isa", choices=sorted(AS_ISA), help="run as this lesser x86 level (see above)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.as_isa:  # every step below is a subprocess: they all inherit it
        os.environ.update({"DUOSERVE_CPU_ISA": args.as_isa, **AS_ISA[args.as_isa]})
    host = cpu() | ({"as_isa": args.as_isa} if args.as_isa else {})
    env_line = run([sys.executable, "-m", "duoserve.cli", "env"], out / "env.log").splitlines()[0]
    print(f"CPU: {host['model']} (family/model {host['family/model']}, {host['cpus']} CPUs; {host['flags']})")
    if args.as_isa:
        levels = ", ".join(f"{name}={value}" for name, value in sorted(AS_ISA[args.as_isa].items()))
        print(f"run as {args.as_isa}: {levels}")
    print(env_line, flush=True)
    figures = serve(out, args.llama_server) | offline(out) | memory(out)
    (out / "cpu_table.json").write_text(json.dumps({"cpu": host, "env": env_line, **figures}, indent=1))
    print(table(figures))


if __name__ == "__main__":
    main()
