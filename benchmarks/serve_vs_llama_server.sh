#!/usr/bin/env bash
# duoserve serve vs llama.cpp's llama-server (continuous batching, -np 32) on the same GGUF, measured
# one after the other in one run with `duoserve bench` at several concurrencies.
#
#   LLAMA_SERVER=/path/to/llama-server benchmarks/serve_vs_llama_server.sh [OUT_DIR]
#
# Workload: random token-id prompts of 256 tokens, 128 output tokens (ignore_eos), greedy.
# Requests per concurrency C: max(8, 2*C). Results: OUT_DIR/{duoserve,llama-server}-cC.json and a table.
set -euo pipefail
out=${1:-bench_results/serve}
mkdir -p "$out"
gguf=$(python3 -c 'from duoserve.models.loader import default_model_path as p; print(p())')
concurrencies=${CONCURRENCIES:-"1 8 32 64"}
ports=(8100 8101)

wait_ready() {  # URL
  for _ in $(seq 1 240); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not become ready" >&2
  return 1
}

run_bench() {  # LABEL PORT
  for c in $concurrencies; do
    n=$(( c * 2 > 8 ? c * 2 : 8 ))
    duoserve bench --base-url "http://127.0.0.1:$2" --endpoint /v1/completions --dataset random \
      --prompt-format token-ids --random-input-len 256 --random-output-len 128 --num-prompts "$n" \
      --concurrency "$c" --ignore-eos --seed 0 --label "$1" --disable-tqdm \
      --slo ttft=2,tpot=0.25 --output "$out/$1-c$c.json" > "$out/$1-c$c.txt"
  done
}

duoserve serve --port "${ports[0]}" --max-num-seqs 64 --max-num-batched-tokens 512 --log-level WARNING &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_ready "http://127.0.0.1:${ports[0]}/ready"
run_bench duoserve "${ports[0]}"
kill -TERM $pid; wait $pid || true

"${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}" -m "$gguf" --host 127.0.0.1 \
  --port "${ports[1]}" -c 16384 -np 32 --cont-batching -t "$(nproc)" --no-webui > "$out/llama-server.log" 2>&1 &
pid=$!
wait_ready "http://127.0.0.1:${ports[1]}/health"
run_bench llama-server "${ports[1]}"
kill -TERM $pid; wait $pid || true

python3 - "$out" $concurrencies <<'PY'
import json, sys
out, concurrencies = sys.argv[1], sys.argv[2:]
print("| server | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | goodput req/s |")
print("|---|---|---|---|---|---|---|---|")
for c in concurrencies:
    for label in ("duoserve", "llama-server"):
        s = json.load(open(f"{out}/{label}-c{c}.json"))["summary"]
        print(f"| {label} | {c} | {s['output_throughput']:.1f} | {s['median_ttft_ms']:.0f} | {s['p99_ttft_ms']:.0f} "
              f"| {s['median_tpot_ms']:.0f} | {s['p99_tpot_ms']:.0f} | {s.get('request_goodput', float('nan')):.2f} |")
PY
