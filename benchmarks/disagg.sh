#!/usr/bin/env bash
# Disaggregated prefill/decode vs colocated serving at equal total CPU, in one run, with `duoserve bench`.
#
#   benchmarks/disagg.sh [OUT_DIR]
#
# Deployments (all behind `duoserve up`'s router, workers pinned to cores, SmolLM2 GGUF):
#   disagg     1 prefill worker (1 core) + 1 decode worker (1 core)
#   replicas   2 colocated workers of 1 core each, KV-aware routing
#   colocated  1 colocated worker of 2 cores
# Mixed workload, both streams at once:
#   decode stream   short prompts (64 tokens), long generations (128 tokens), concurrency 4
#   prefill stream  long prompts (PREFILL_LEN tokens, 8 output tokens) arriving as Poisson at PREFILL_RATE/s
# plus a baseline: the decode stream alone on the disagg deployment (no prefill interference).
# Then multi-turn shared-prefix chat on 2 replicas: KV-aware vs round-robin routing.
set -euo pipefail
out=${1:-bench_results/disagg}
mkdir -p "$out"
port=8200
prefill_len=${PREFILL_LEN:-768}
prefill_rate=${PREFILL_RATE:-0.08}
decode_prompts=${DECODE_PROMPTS:-24}
prefill_prompts=${PREFILL_PROMPTS:-6}

wait_ready() {
  for _ in $(seq 1 480); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "deployment did not become ready" >&2
  return 1
}

start() {  # NAME UP-ARGS...
  local name=$1; shift
  duoserve up --port "$port" --log-level WARNING "$@" > "$out/$name.log" 2>&1 &
  pid=$!
  wait_ready
  sleep 3  # every worker healthy in the router
}

stop() {
  curl -s "http://127.0.0.1:$port/router/workers" > "$out/$1-workers.json" || true
  for url in $(python3 -c "import json,sys; [print(w['url']) for w in json.load(open('$out/$1-workers.json'))['workers']]"); do
    curl -s "$url/metrics" | grep -E '^duoserve:(kv_transfer|prefix_cache|iteration_tokens_total_(sum|count))' \
      | sed "s|^|$url |" >> "$out/$1-worker-metrics.txt" || true
  done
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^duoserve:prefix_cache' > "$out/$1-router-metrics.txt" || true
  kill -TERM $pid; wait $pid || true
}

bench() {  # LABEL ARGS...
  local label=$1; shift
  duoserve bench --base-url "http://127.0.0.1:$port" --ignore-eos --seed 0 --label "$label" --disable-tqdm \
    --output "$out/$label.json" "$@" > "$out/$label.txt"
}

decode_stream() {
  bench "$1-decode" --dataset random --prompt-format token-ids --random-input-len 64 --random-output-len 128 \
    --num-prompts "$decode_prompts" --concurrency 4 --slo ttft=2,tpot=0.25
}

prefill_stream() {
  bench "$1-prefill" --dataset random --prompt-format token-ids --random-input-len "$prefill_len" \
    --random-output-len 8 --num-prompts "$prefill_prompts" --request-rate "$prefill_rate" --slo ttft=30,tpot=0.25
}

mixed() {  # NAME
  decode_stream "$1" & local d=$!
  prefill_stream "$1" & local p=$!
  wait $d $p
}

start disagg --prefill 1 --decode 1 --threads-per-worker 1 --pin
decode_stream nopf
mixed disagg
stop disagg

start replicas --replicas 2 --threads-per-worker 1 --pin
mixed replicas
stop replicas

start colocated --replicas 1 --threads-per-worker 2 --pin
mixed colocated
stop colocated

for policy in kv round_robin; do
  start "mt-$policy" --replicas 2 --threads-per-worker 1 --pin --policy "$policy"
  bench "mt-$policy" --endpoint /v1/chat/completions --dataset multi-turn --multi-turn-turns 4 \
    --random-input-len 128 --random-output-len 32 --num-prompts 8 --concurrency 4 --slo ttft=2,tpot=0.25
  stop "mt-$policy"
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def s(label):
    return json.load(open(f"{out}/{label}.json"))["summary"]
print("| deployment | decode ITL p50 ms | decode ITL p99 ms | decode TTFT p50 ms | decode TTFT p99 ms | long-prompt TTFT p50 ms | long-prompt TTFT p99 ms | decode goodput req/s | output tok/s (decode stream) |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("nopf", "disagg", "replicas", "colocated"):
    d = s(f"{name}-decode")
    try:
        p = s(f"{name}-prefill")
        pt = f"{p['median_ttft_ms']:.0f} | {p['p99_ttft_ms']:.0f}"
    except FileNotFoundError:
        pt = "- | -"
    print(f"| {name} | {d['median_itl_ms']:.0f} | {d['p99_itl_ms']:.0f} | {d['median_ttft_ms']:.0f} | {d['p99_ttft_ms']:.0f} "
          f"| {pt} | {d['request_goodput']:.3f} | {d['output_throughput']:.1f} |")
print()
print("| routing | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | prefix-cache hit rate | output tok/s |")
print("|---|---|---|---|---|---|")
for policy in ("kv", "round_robin"):
    d = s(f"mt-{policy}")
    m = {}
    for line in open(f"{out}/mt-{policy}-router-metrics.txt"):
        name, value = line.rsplit(" ", 1)
        m[name.split("{")[0]] = float(value)
    rate = m["duoserve:prefix_cache_hits_total"] / max(1.0, m["duoserve:prefix_cache_queries_total"])
    print(f"| {policy} | {d['median_ttft_ms']:.0f} | {d['p99_ttft_ms']:.0f} | {d['median_itl_ms']:.0f} | {rate:.1%} | {d['output_throughput']:.1f} |")
PY
