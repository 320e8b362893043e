#!/usr/bin/env bash
# Soak: a server at 2x its capacity for DURATION seconds, with a bounded queue, on 127.0.0.1 only.
#
#   benchmarks/soak.sh [OUT_DIR] [-- SERVER ARGS]      # duoserve serve (SmolLM2 Q4_1), 10 minutes
#   DURATION=60 CALIBRATE=10 benchmarks/soak.sh /tmp/soak   # a smoke run
#   UP="--prefill 1 --decode 1" benchmarks/soak.sh        # a disaggregated deployment (duoserve up)
#   DRIVER_ARGS="--max-tokens 8" benchmarks/soak.sh       # flags of `python benchmarks/reliability.py soak -h`
#
# The server runs with --max-num-seqs 8 and --max-queued-requests QUEUE (16). A closed loop of 8 streams
# measures its capacity (CALIBRATE seconds, which also warm it up), then Poisson arrivals at LOAD_FACTOR
# (2) x capacity run for DURATION (600) seconds: the batch is full, the queue fills, overload gets 429s. Reports the counts of 200/429/5xx/other, whether every 200
# completed its stream, the RSS of every server and engine process (first, last, max, drift) and KV usage
# after the load. Exits 1 on any 5xx, an incomplete 200, an RSS drift over 5%, or KV usage not back to 0.
# Writes OUT_DIR/soak.json, soak.txt and server.log. It starts and stops the server itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results/soak}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
args=(soak --duration "${DURATION:-600}" --load-factor "${LOAD_FACTOR:-2}" --max-queued-requests "${QUEUE:-16}"
  --calibrate-seconds "${CALIBRATE:-30}" --sample-interval "${SAMPLE_INTERVAL:-10}"
  --log "$out/server.log" --output "$out/soak.json")
[ -n "${UP:-}" ] && args+=(--up "$UP")
# shellcheck disable=SC2206
args+=(${DRIVER_ARGS:-})  # more flags of benchmarks/reliability.py soak, e.g. "--max-tokens 8"
python benchmarks/reliability.py "${args[@]}" -- "$@" 2>&1 | tee "$out/soak.txt"
