#!/usr/bin/env bash
# A long schemathesis run over /openapi.json against a real `duoserve serve`, for RELIABILITY.md.
#
#   benchmarks/fuzz_api.sh [OUT_DIR]
#   EXAMPLES=500 MODEL=path/to/model SEED=1 benchmarks/fuzz_api.sh     (defaults: 200, SmolLM2's GGUF, random)
#
# Every phase (examples, coverage, fuzzing; positive and negative data) and every check but
# positive_data_acceptance: the schema states types, and values a type admits can still be refused (a
# prompt longer than the context, a model name that is not served). Passes when schemathesis reports no
# failure (no 5xx, every status code, content type and body as documented), the server log has no
# traceback and no dead engine, and the server still answers. The context is kept short (MAX_MODEL_LEN,
# default 128) so that a fuzzed n=128 chat request without max_tokens ends in seconds, not minutes.
#
# The suite's short run of the same (tiny random model, fuzzing phase only) takes its example count from
# DUOSERVE_FUZZ_EXAMPLES:  DUOSERVE_FUZZ_EXAMPLES=200 python -m pytest -q tests/server/test_openapi.py
set -euo pipefail
cd "$(dirname "$0")/.."  # python -m duoserve.cli below: this checkout's duoserve, installed or not
out=${1:-bench_results/fuzz_api}
mkdir -p "$out"
examples=${EXAMPLES:-200}
port=${PORT:-8300}
key=fuzz-$RANDOM$RANDOM
base=http://127.0.0.1:$port
seed_args=()
[[ -n ${SEED:-} ]] && seed_args=(--seed "$SEED")

# shellcheck disable=SC2086  # MODEL and EXTRA_ARGS are word lists on purpose
python -m duoserve.cli serve ${MODEL:-} --port "$port" --api-key "$key" --max-model-len "${MAX_MODEL_LEN:-128}" \
  ${EXTRA_ARGS:-} > "$out/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf -H "Authorization: Bearer $key" "$base/ready" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "the server exited:" >&2; cat "$out/server.log" >&2; exit 1; }
  sleep 0.5
done

status=0
st run "$base/openapi.json" -H "Authorization: Bearer $key" --max-examples "$examples" \
  --exclude-checks positive_data_acceptance --continue-on-failure --request-timeout 300 --workers 1 \
  --suppress-health-check all --report junit --report-dir "$out" --no-color "${seed_args[@]}" \
  | tee "$out/schemathesis.txt" || status=$?

code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"prompt": "Hello", "max_tokens": 4}' "$base/v1/completions")
if [[ $code != 200 ]] || grep -qE 'Traceback|engine died|internal error' "$out/server.log"; then
  echo "the server is not well after the run (last request: $code); see $out/server.log" >&2
  status=1
fi
# What RELIABILITY.md quotes: how many cases, what failed, the seed that replays them.
grep -E 'generated|failure|Seed' "$out/schemathesis.txt" | tail -4
exit $status
