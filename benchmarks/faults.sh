#!/usr/bin/env bash
# kill -9 of a decode worker, then of a prefill worker, of a `duoserve up` deployment under load.
#
#   benchmarks/faults.sh [OUT_DIR] [-- SERVER ARGS]   # up --prefill 1 --decode 2, SmolLM2 Q4_1
#   UP="--prefill 2 --decode 2" benchmarks/faults.sh   # another deployment
#   DRIVER_ARGS="--max-tokens 16" benchmarks/faults.sh  # flags of `python benchmarks/reliability.py faults -h`
#
# For each kill: a closed loop of CONCURRENCY (8) streams, half with long prompts (prefilled remotely),
# WARMUP (10) seconds of it, then SIGKILL of the worker. Reports, for the requests in flight then, which
# completed anyway (a lost prefill worker's requests are prefilled on their decode worker) and the
# seconds from the kill to each other one's terminal error; the seconds until the router took the worker
# out and until it rejoined (`up` restarts it); what requests sent after it was taken out got; the KV
# usage of every worker after the load. Exits 1 if a stream in flight ended without completing or a
# terminal error, a terminal error came after 2 s, the worker did not rejoin, a request sent after it
# was taken out failed, or a worker's KV usage did not return to 0. Writes OUT_DIR/faults-KIND.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results/faults}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
status=0
for kind in decode prefill; do
  args=(faults --kill "$kind" --up "${UP:---prefill 1 --decode 2}" --concurrency "${CONCURRENCY:-8}"
    --warmup "${WARMUP:-10}" --log "$out/server-$kind.log" --output "$out/faults-$kind.json")
  # shellcheck disable=SC2206
  args+=(${DRIVER_ARGS:-})  # more flags of benchmarks/reliability.py faults, e.g. "--max-tokens 16"
  python benchmarks/reliability.py "${args[@]}" -- "$@" 2>&1 | tee "$out/faults-$kind.txt" || status=1
done
exit $status
