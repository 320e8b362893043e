"""The planner's predictions against measured runs: `duoserve plan simulate` against `duoserve bench`.

    python benchmarks/planner_accuracy.py [--out DIR] [--num-prompts 40] [--input-len 128] [--output-len 32]
        [--rates R1,R2,R3] [--profile-args "..."] [--model PATH] [--only serve|up-1p1d]

For each deployment, `duoserve serve` (1 worker, all cores) and `duoserve up --prefill 1 --decode 1`
(1 pinned core each), it profiles a worker with the deployment's thread count (`duoserve plan profile`),
then, at three request rates (by default 0.3x, 0.9x and 1.3x the capacity the planner predicts: low,
near capacity, over) and two arrival processes at the same mean rate (Poisson, and gamma with CV 3,
i.e. --burstiness 1/9), runs `duoserve bench` against the live deployment and `duoserve plan simulate`
with the same flags, and prints a markdown table of p50/p99 TTFT and ITL, predicted against measured,
with their ratio. The goal (issue 13): p50 within 20%, p99 within 35%.

--fit-from-trace: every deployment runs with `--step-trace` (duoserve/plan/trace.py; `up` gives its
prefill and decode workers a trace each, DIR/up-1p1d-trace-<role>.jsonl), and a second profile is
fitted to served steps (`duoserve plan profile --from-trace`: what the served engines really ran, in
their own processes beside the API servers, the router and the client; for `up` a step model per role,
and how the steps spread around it), and every point is simulated again with it
(DIR/<point>-predicted-trace.json): a second table. What the fit learns from (--train): `sweep`
(default), a closed-loop calibration sweep run on the live deployment before the points (`duoserve
bench --concurrency C` at C = 4, 16, 40 and --num-prompts, this workload's lengths, other seeds, no
arrival process: every point is held out), as an operator would profile a served worker before
planning; `low`, the low-load points (near and over held out). Each window's steps are cut out of the
traces (DIR/<label>-trace[-<role>].jsonl). With --resimulate it refits from the traces already in DIR.

--quick: a smoke run of the whole pipeline (a few short requests, a tiny profile grid, fixed rates):
it checks that the script works, and measures nothing worth reporting.

Every result file (bench's JSON, measured and predicted) is kept in --out, so `duoserve bench plot
DIR/*.json` draws predicted against measured. A full run takes about 10-12 minutes on 2 Zen 1 cores
(SmolLM2 prefills ~400 tokens/s there, in float32), 5-6 minutes on 2 Zen 5 cores (bfloat16, ~1700
tokens/s): hence short prompts and few requests per point; the profile grid (--profile-args) covers the
shapes this workload makes rather than the default's long contexts. With 40 requests a point, p99 is
about the slowest request: one step slowed by another process on the machine moves it (a 264 ms prefill
step among 130 ms ones put a low-load p99 TTFT at 463 ms against 283 in the next run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

PORT = 8310
BURSTS = (("poisson", 1.0), ("gamma-cv3", 1 / 9))
LEVELS = ("low", "near", "over")  # the three request rates of a deployment, in order
METRICS = (("p50 TTFT", "p50_ttft_ms", 0.20), ("p99 TTFT", "p99_ttft_ms", 0.35))
METRICS += (("p50 ITL", "p50_itl_ms", 0.20), ("p99 ITL", "p99_itl_ms", 0.35))


def run(cmd: list[str], log: str | None = None) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)


def duoserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "duoserve.cli", *args]


def wait_ready(proc: subprocess.Popen, deadline: float = 600.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def workload_flags(args: argparse.Namespace, rate: float, burstiness: float, seed: int = 0) -> list[str]:
    return [
        "--dataset", "random", "--prompt-format", "token-ids", "--ignore-eos",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--request-rate", f"{rate:.4g}",
        "--burstiness", f"{burstiness:.6g}", "--seed", str(seed),
    ]  # fmt: skip


def predicted_capacity(profile: str, deployment: str, args: argparse.Namespace, out: str) -> float:
    """Requests per second the planner predicts the deployment sustains (all requests at once)."""
    path = os.path.join(out, f"capacity-{deployment.replace(':', '-')}.json")
    flags = workload_flags(args, float("inf"), 1.0)
    run(
        duoserve(
            "plan", "simulate", "--profile", profile, "--deployment", deployment, *flags, "--output", path
        )
    )
    return load_summary(path)["request_throughput"]


def load_summary(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["summary"]


def bench_point(args, profile, deployment, label, rate, burstiness, out, seed: int) -> dict:
    # A seed per point: the same prompts sent again to the running server would hit its prefix cache,
    # which the simulation (an empty cache per point) does not have.
    flags = workload_flags(args, rate, burstiness, seed=seed)
    measured = os.path.join(out, f"{label}-measured.json")
    run(
        duoserve("bench", "--base-url", f"http://127.0.0.1:{PORT}", "--disable-tqdm", "--label",
                 f"measured {deployment}", *flags, "--output", measured),
        os.path.join(out, f"{label}-bench.txt"),
    )  # fmt: skip
    return simulate_point(args, profile, deployment, label, rate, burstiness, out, seed)


def simulate_point(
    args, profile, deployment, label, rate, burstiness, out, seed: int, suffix: str = "", extra=()
) -> dict:
    """The prediction for a point, next to its measured result file (already in `out`)."""
    flags = workload_flags(args, rate, burstiness, seed=seed)
    measured = os.path.join(out, f"{label}-measured.json")
    predicted = os.path.join(out, f"{label}-predicted{suffix}.json")
    run(
        duoserve(
            "plan",
            "simulate",
            "--profile",
            profile,
            "--deployment",
            deployment,
            *flags,
            "--output",
            predicted,
            *extra,
        )
    )
    return {
        "measured": json.load(open(measured))["summary"],
        "predicted": json.load(open(predicted))["summary"],
    }


def deployments(args: argparse.Namespace) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, simulated deployment, server command, profile engine args)."""
    model = [args.model] if args.model else []
    cores = os.cpu_count() or 1
    serve = duoserve("serve", *model, "--port", str(PORT), "--log-level", "WARNING")
    up = duoserve(
        "up", *model, "--prefill", "1", "--decode", "1", "--port", str(PORT), "--log-level", "WARNING",
        *(["--threads-per-worker", "1", "--pin"] if cores >= 2 else []),
    )  # fmt: skip
    # `up` gives each worker cores / workers threads; `serve` takes all the cores.
    if args.fit_from_trace:
        serve += ["--step-trace", os.path.join(args.out, "serve-trace.jsonl")]
        up += ["--step-trace", os.path.join(args.out, "up-1p1d-trace-{role}.jsonl")]
    return [
        ("serve", "colocated:1", serve, []),
        ("up-1p1d", "disagg:1x1", up, ["--num-threads", "1"] if cores >= 2 else []),
    ]


def ratio_cell(predicted: float | None, measured: float | None, goal: float) -> str:
    if predicted is None or measured is None or measured <= 0:
        return "-"
    ratio = predicted / measured
    mark = "" if abs(ratio - 1) <= goal else " ✗"
    return f"{predicted:.0f} / {measured:.0f} ({ratio:.2f}{mark})"


def main() -> int:
    global PORT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results/planner_accuracy")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rates", help="three request rates (default: 0.3, 0.9, 1.3 x predicted capacity)")
    parser.add_argument(
        "--profile-args",
        default="--decode-batches 1,4,16,32 --context-lens 64,256 --prefill-lens 16,128,256 "
        "--chunked-prompt-len 512 --transfer-tokens 128,512",
        help="`duoserve plan profile` grid flags",
    )
    parser.add_argument("--model", help="model path (default: duoserve's default model)")
    parser.add_argument("--only", choices=("serve", "up-1p1d"), help="run one deployment")
    parser.add_argument(
        "--fit-from-trace",
        action="store_true",
        help="serve with --step-trace, fit a second profile from served steps (--train) and predict "
        "every point again with it (a second table)",
    )
    parser.add_argument(
        "--train",
        choices=("sweep", "low"),
        default="sweep",
        help="what the trace fit learns from: sweep (default), a closed-loop sweep at concurrency "
        + ",".join(map(str, SWEEP_CONCURRENCIES))
        + " run before the points (all points held out); low: the low-load points (near and over held out)",
    )
    parser.add_argument(
        "--resimulate",
        action="store_true",
        help="measure nothing: predict again every point whose measured file --out holds, with the "
        "profiles there (after a change to the planner)",
    )
    parser.add_argument("--port", type=int, default=8310, help="port of the served deployment")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + QUICK_NOTE)
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 4, 80, 4
        args.rates = args.rates or "0.5,1,2"
        args.profile_args = QUICK_PROFILE_ARGS
        args.sweep = QUICK_SWEEP
    else:
        # Up to every request of a point in flight at once (as over capacity).
        args.sweep = tuple(sorted({*SWEEP_CONCURRENCIES, args.num_prompts}))
    PORT = args.port
    os.makedirs(args.out, exist_ok=True)
    started = datetime.now(timezone.utc)
    rows, trace_rows = [], []
    for name, deployment, server_cmd, profile_flags in deployments(args):
        if args.only and name != args.only:
            continue
        if args.resimulate:
            points = resimulate_deployment(args, name, deployment)
        else:
            points = measure_deployment(args, name, deployment, server_cmd, profile_flags)
        rows += points
        if args.fit_from_trace:
            trace_rows += trace_fit_deployment(args, name, deployment, points)
    print(report(rows, args, started))
    if trace_rows:
        if args.train == "sweep":
            trained = "a closed-loop sweep at concurrency " + ", ".join(map(str, args.sweep))
        else:
            trained = ", ".join(
                f"{name} {level} {burst}"
                for name, level, _, burst, _ in trace_rows
                if level.startswith(TRAIN_LEVEL)
            )
        title = f"Fitted from the served engine's step trace (trained on: {trained}; the rest held out)"
        print("\n" + report(trace_rows, args, started, title))
    return 0


TRAIN_LEVEL = "low"  # --train low: the points whose steps a trace-fitted profile learns from
# --train sweep: a closed-loop calibration sweep run before the points (none of them trained on).
SWEEP_LEVEL = "sweep"
SWEEP_CONCURRENCIES = (4, 16, 40)
SWEEP_SEED = 1000
QUICK_SWEEP = (2,)
# 80-token prompts: over `up`'s --remote-prefill-min-tokens (64), so its prefill worker runs them.
QUICK_NOTE = "4 prompts of 80 tokens, 4 output tokens, rates 0.5,1,2 req/s, a tiny profile grid"
QUICK_PROFILE_ARGS = (
    "--decode-batches 1,4 --context-lens 32,96 --prefill-lens 16,80 --chunked-prompt-len 128 "
    "--transfer-tokens 32,64 --repeats 1"
)
# The traces each deployment's workers write (--step-trace), by role ("": one colocated worker).
TRACE_ROLES = {"serve": ("",), "up-1p1d": ("prefill", "decode")}


def trace_path(out: str, label: str, role: str) -> str:
    return os.path.join(out, f"{label}-trace{'-' + role if role else ''}.jsonl")


def trace_fit_deployment(args, name, deployment, points) -> list:
    """Cut each point's steps out of the workers' traces, fit a profile to the low-load points' steps
    (a step model per role for P/D), and predict every point again with it."""
    from duoserve.plan.trace import read_trace, slice_trace

    with open(os.path.join(args.out, f"{name}-windows.json")) as f:
        windows = json.load(f)
    roles = []
    for role in TRACE_ROLES[name]:
        try:
            read_trace(trace_path(args.out, name, role))
            roles.append(role)
        except ValueError as err:  # e.g. a prefill worker that got no prompt (all shorter than the minimum)
            print(f"{name}: {err}", file=sys.stderr)
    train, train_level = [], SWEEP_LEVEL if args.train == "sweep" else TRAIN_LEVEL
    for label, (start, end) in windows.items():
        for role in roles:
            path = trace_path(args.out, label, role)
            num_steps = slice_trace(trace_path(args.out, name, role), start, end, path)
            print(
                f"{label}: {num_steps} traced steps{' of the ' + role + ' worker' if role else ''}",
                file=sys.stderr,
            )
            if label.startswith(f"{name}-{train_level}-") and num_steps:
                train.append(path)
    if not train:
        raise RuntimeError(f"no traced steps to train on (--train {args.train}): nothing to fit")
    profile = os.path.join(args.out, f"profile-{name}-trace.json")
    synthetic = os.path.join(args.out, f"profile-{name}.json")
    prior = ["--prior", synthetic] if os.path.exists(synthetic) else []  # and its KV transfer model
    run(
        duoserve("plan", "profile", "--from-trace", *train, *prior, "-o", profile),
        os.path.join(args.out, f"profile-{name}-trace.txt"),
    )
    rows = []
    for _, level, rate, burst_name, _ in points:
        label = f"{name}-{level}-{burst_name}"
        with open(os.path.join(args.out, f"{label}-measured.json")) as f:
            seed = json.load(f)["config"]["seed"]
        burstiness = dict(BURSTS)[burst_name]
        simulated = os.path.join(args.out, f"{label}-predicted-trace-steps.jsonl")
        point = simulate_point(
            args, profile, deployment, label, rate, burstiness, args.out, seed, "-trace",
            ["--step-trace", simulated],
        )  # fmt: skip
        served = [trace_path(args.out, label, role) for role in roles]
        print_step_mix(label, served, simulated)
        print_step_residuals(label, served, profile)
        rows.append(
            (
                f"{name} (trace fit)",
                level + (" (train)" if args.train == "low" and level == TRAIN_LEVEL else ""),
                rate,
                burst_name,
                point,
            )
        )
    return rows


def resimulate_deployment(args, name, deployment) -> list:
    profile = os.path.join(args.out, f"profile-{name}.json")
    rows = []
    for level in LEVELS:
        for burst_name, _ in BURSTS:
            label = f"{name}-{level}-{burst_name}"
            measured = os.path.join(args.out, f"{label}-measured.json")
            if not os.path.exists(measured):
                continue
            with open(measured) as f:
                config = json.load(f)["config"]
            rate, burstiness, seed = config["request_rate"], config["burstiness"], config["seed"]
            point = simulate_point(args, profile, deployment, label, rate, burstiness, args.out, seed)
            rows.append((name, level, rate, burst_name, point))
    return rows


def measure_deployment(args, name, deployment, server_cmd, profile_flags) -> list:
    profile = os.path.join(args.out, f"profile-{name}.json")
    model = [args.model] if args.model else []
    run(
        duoserve("plan", "profile", *model, *profile_flags, *shlex.split(args.profile_args), "-o", profile),
        os.path.join(args.out, f"profile-{name}.txt"),
    )
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    else:
        capacity = predicted_capacity(profile, deployment, args, args.out)
        rates = [round(capacity * f, 3) for f in (0.3, 0.9, 1.3)]
    rows, windows = [], {}
    print("+ " + shlex.join(server_cmd), file=sys.stderr, flush=True)
    with open(os.path.join(args.out, f"{name}-server.log"), "w") as log:
        proc = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(proc)
            time.sleep(3)  # every worker healthy in the router
            warm = workload_flags(args, float("inf"), 1.0, seed=99)
            warm[warm.index("--num-prompts") + 1] = "4"
            run(duoserve("bench", "--base-url", f"http://127.0.0.1:{PORT}", "--disable-tqdm", *warm))
            if args.fit_from_trace and args.train == "sweep":
                windows |= calibration_sweep(args, name)
            for level, rate in zip(LEVELS, rates, strict=True):
                for burst_name, burstiness in BURSTS:
                    label = f"{name}-{level}-{burst_name}"
                    seed = len(rows) + 1  # distinct per point (the warm-up uses 99)
                    start = time.time()
                    point = bench_point(args, profile, deployment, label, rate, burstiness, args.out, seed)
                    windows[label] = (start, time.time())
                    rows.append((name, level, rate, burst_name, point))
        finally:
            stop(proc)  # a graceful stop: the engine closes its step trace
    with open(os.path.join(args.out, f"{name}-windows.json"), "w") as f:
        json.dump(windows, f, indent=1)  # each point's wall-clock span, to cut its steps out of a trace
    return rows


def calibration_sweep(args: argparse.Namespace, name: str) -> dict[str, tuple[float, float]]:
    """Closed-loop load at a few concurrencies (`duoserve bench --concurrency C`, all requests sent at
    once, each next one when one ends): the served steps a trace fit learns from, apart from the points
    (other seeds, no arrival process), from a few rows a step to more than the over-capacity point holds
    in flight. Returns each sweep's wall-clock span, to cut its steps out of the trace."""
    windows = {}
    for concurrency in args.sweep:
        label = f"{name}-{SWEEP_LEVEL}-c{concurrency}"
        flags = workload_flags(args, float("inf"), 1.0, seed=SWEEP_SEED + concurrency)
        flags[flags.index("--num-prompts") + 1] = str(max(3 * concurrency, args.num_prompts // 4))
        start = time.time()
        run(
            duoserve("bench", "--base-url", f"http://127.0.0.1:{PORT}", "--disable-tqdm",
                     "--concurrency", str(concurrency), *flags, "--output",
                     os.path.join(args.out, f"{label}-measured.json")),
            os.path.join(args.out, f"{label}-bench.txt"),
        )  # fmt: skip
        windows[label] = (start, time.time())
    return windows


def print_step_mix(label: str, served: list[str], simulated: str) -> None:
    """The served steps of a point beside the simulated ones (same arrivals): their batches, worker by
    worker (the simulator writes PATH.<index> for several workers, each with its role)."""
    import glob

    from duoserve.plan.trace import read_trace, step_mix, trace_role

    try:
        simulated_traces = [
            read_trace(p) for p in [simulated, *sorted(glob.glob(simulated + ".*"))] if os.path.exists(p)
        ]
        by_role = {trace_role(t): t for t in simulated_traces}
        for path in served:
            real = read_trace(path)
            mixes = [step_mix(real), step_mix(by_role[trace_role(real)])]
            keys = list(mixes[0])
            print(f"{label} {trace_role(real)} steps, served / simulated: " + ", ".join(
                f"{k} {mixes[0][k]:.4g} / {mixes[1][k]:.4g}" for k in keys), file=sys.stderr)  # fmt: skip
    except (ValueError, KeyError) as err:  # a point whose window caught no step
        print(f"{label}: {err}", file=sys.stderr)


def print_step_residuals(label: str, served: list[str], profile_path: str) -> None:
    """How the fitted step model predicts a point's own served steps (their periods), by regime: on the
    held-out points, whether the served steps ran slower at load than the same shapes did in the training
    points (what the simulator cannot know), apart from whether the simulated schedule differs (the mix)."""
    from duoserve.plan.profile import load_profile
    from duoserve.plan.trace import (
        format_residuals,
        read_trace,
        residuals_by_regime,
        step_periods,
        trace_role,
    )

    profile = load_profile(profile_path)
    for path in served:
        try:
            trace = read_trace(path)
        except ValueError as err:  # a point whose window caught no step
            print(f"{label}: {err}", file=sys.stderr)
            continue
        model, limits = profile.for_role(trace_role(trace))
        shapes = [s.shape for s in trace.steps]
        rows = residuals_by_regime(model, shapes, step_periods(trace), limits.max_num_batched_tokens)
        print(f"{label} {trace_role(trace)} served step periods against the fitted model:", file=sys.stderr)
        print(format_residuals(rows), file=sys.stderr)


def report(rows, args, started: datetime, title: str = "Planner accuracy") -> str:
    from duoserve.hardware import host_defaults

    cpu = host_defaults().cpu
    lines = [
        f"## {title}: predicted / measured (ms), ratio",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- CPU: {cpu.model}, {cpu.cores} cores ({platform.machine()}); date: {started:%Y-%m-%d %H:%M} UTC",
        f"- workload: random, {args.num_prompts} prompts of {args.input_len} tokens, "
        f"{args.output_len} output tokens (ignore_eos); goal: p50 within 20%, p99 within 35% (✗: a miss)",
        "",
        "| deployment | load | rate req/s | arrivals | " + " | ".join(m for m, _, _ in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    hits = total = 0
    for name, level, rate, burst, point in rows:
        cells = []
        for _, key, goal in METRICS:
            p, m = point["predicted"].get(key), point["measured"].get(key)
            cells.append(ratio_cell(p, m, goal))
            if p is not None and m:
                total += 1
                hits += abs(p / m - 1) <= goal
        lines.append(f"| {name} | {level} | {rate:g} | {burst} | " + " | ".join(cells) + " |")
    lines += ["", f"{hits} of {total} within the goal."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
