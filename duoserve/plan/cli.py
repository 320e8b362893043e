"""`duoserve plan profile | simulate | recommend | serve`: argument parsing and the top-level flow.

The workload flags are `duoserve bench`'s (same names, defaults and generators), so a bench command
line can be simulated as it is, and `simulate --output` writes a bench result file that `duoserve bench
plot` draws next to measured ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from duoserve.bench.metrics import PERCENTILES

if TYPE_CHECKING:
    from duoserve.plan.step_model import StepSpread

DESCRIPTION = (
    "Size a deployment for an SLO: profile a worker, simulate a deployment under a workload (the "
    "engine's own scheduler and the router's own policy on a virtual clock), recommend replica counts."
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_profile_parser(sub: Any) -> None:
    from duoserve.config import add_engine_args
    from duoserve.plan.profile import Grid

    p = sub.add_parser(
        "profile",
        help="measure a worker's step time by step shape, and the KV transfer time",
        description="Run the engine (with these engine arguments) on synthetic steps of chosen shapes, "
        "fit step time = a + b*kernel_rows + c*tiled_rows + d*decode_context + e*prefill_attention + "
        "f*tiled + g*sampled_rows + h*streamed (duoserve/plan/step_model.py; streamed: the tokens a "
        "served front end streams during the step, learnt from --from-trace only), "
        "and time the KV transfer of disaggregation. Takes about a minute with the default model.",
    )
    add_engine_args(p, positional_model=True)
    g = p.add_argument_group("grid")
    grid = Grid()
    g.add_argument("--decode-batches", type=_ints, default=grid.decode_batches, help="e.g. 1,8,32")
    g.add_argument("--context-lens", type=_ints, default=grid.context_lens, help="e.g. 128,1024")
    g.add_argument("--prefill-lens", type=_ints, default=grid.prefill_lens, help="e.g. 32,128,448")
    g.add_argument("--chunked-prompt-len", type=int, default=grid.chunked_prompt_len)
    g.add_argument("--transfer-tokens", type=_ints, default=grid.transfer_tokens)
    g.add_argument("--repeats", type=int, default=grid.repeats)
    t = p.add_argument_group("from a served engine's steps (instead of synthetic ones)")
    t.add_argument(
        "--from-trace",
        nargs="+",
        metavar="TRACE",
        help="fit the step model to the steps of these step traces (`duoserve serve --step-trace "
        "PATH`): what the engine really ran, in the process layout it runs in, and how its steps spread "
        "around the model (which `plan simulate` draws from); no model is loaded",
    )
    t.add_argument(
        "--fit-time",
        choices=("period", "step"),
        default="period",
        help="period: a step plus the engine loop's time to the next step (what a served step costs); "
        "step: EngineCore.step alone",
    )
    t.add_argument(
        "--prior",
        metavar="PROFILE",
        help="a synthetic profile of the same worker: its measured steps (weighing 20%% of the traced "
        "ones) settle what one workload's steps cannot tell apart; its KV transfer model is kept",
    )
    t.add_argument(
        "--kv-transfer-from", metavar="PROFILE", help="take the KV transfer model from this profile"
    )
    p.add_argument("-o", "--output", default="profile.json", help="profile file to write")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="profile in this process, with its OpenMP environment (default: in a process started as "
        "the server's engine process is, duoserve/engine/engine_env.py)",
    )
    p.set_defaults(plan_func=cmd_profile)


def _add_common(p: argparse.ArgumentParser, slo_required: bool) -> None:
    from duoserve.plan.workload import add_workload_args

    p.add_argument("--profile", required=True, help="a profile from `duoserve plan profile`")
    add_workload_args(p)
    p.add_argument(
        "--slo",
        required=slo_required,
        help="objectives in seconds: ttft=S,itl=S,tpot=S,e2e=S (e.g. ttft=0.5,itl=0.05)",
    )
    g = p.add_argument_group("router (as `duoserve router`)")
    g.add_argument("--policy", default="kv", choices=("kv", "round_robin", "least_loaded"))
    g.add_argument("--remote-prefill-min-tokens", type=int, default=64)
    g.add_argument("--max-prefill-queue-tokens", type=int, default=8192)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--percentile", type=int, default=99, choices=PERCENTILES, help="percentile the SLO bounds"
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=0.0,
        help="meet the SLO at this fraction above the workload's rate (0.2: 20%% more traffic)",
    )
    p.add_argument("--max-replicas", type=int, default=8, help="most workers to consider")


def _add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict a deployment's latencies under a workload (bench's flags)",
        description="Discrete-event simulation: the engine's scheduler and KV accounting per worker, the "
        "router's policy, step times from the profile. Prints bench's summary; --output writes bench's "
        "result JSON (label 'predicted DEPLOYMENT').",
    )
    p.add_argument("--deployment", default="colocated:1", help="colocated:N or disagg:PxD")
    _add_common(p, slo_required=False)
    p.add_argument("--output", help="write a `duoserve bench` result file")
    p.add_argument(
        "--step-trace",
        metavar="PATH",
        help="write the simulated steps as a step trace (serve's --step-trace format; PATH.N per worker "
        "when there are several), to compare with a served run's",
    )
    p.add_argument("--label", help="name of this run in plots (default: 'predicted DEPLOYMENT')")
    p.set_defaults(plan_func=cmd_simulate)


def _add_recommend_parser(sub: Any) -> None:
    p = sub.add_parser(
        "recommend",
        help="the cheapest colocated or prefill/decode replica counts that meet an SLO",
        description="Simulate deployments from the cheapest up; print each one's latencies and the "
        "cheapest that meets the SLO at --percentile, and whether disaggregation pays.",
    )
    _add_common(p, slo_required=True)
    _add_plan_args(p)
    p.add_argument("--output", help="write the recommendation as JSON")
    p.set_defaults(plan_func=cmd_recommend)


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="export duoserve:planner_desired_replicas{role} from a router's observed traffic",
        description="Scrape METRICS_URL every --interval seconds, estimate the traffic (rate, burstiness, "
        "lengths) of the last --window seconds, re-run recommend, and export the desired replicas per "
        "role on /metrics, for KEDA or an HPA.",
    )
    p.add_argument("--profile", required=True)
    p.add_argument("--slo", required=True, help="ttft=S,itl=S,tpot=S,e2e=S")
    p.add_argument("--metrics-url", required=True, help="e.g. http://router:8000/metrics")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9400)
    p.add_argument("--interval", type=float, default=15.0, help="seconds between decisions")
    p.add_argument("--window", type=float, default=120.0, help="seconds of traffic each decision reads")
    _add_plan_args(p)
    p.set_defaults(plan_func=cmd_serve, headroom=0.2)


def add_plan_parser(subparsers: Any) -> None:
    """Register `plan` and its subcommands on the main CLI's subparsers."""
    plan = subparsers.add_parser(
        "plan", help="capacity planning: profile, simulate, recommend", description=DESCRIPTION
    )
    sub = plan.add_subparsers(
        dest="plan_command", required=True, metavar="{profile,simulate,recommend,serve}"
    )
    for add in (_add_profile_parser, _add_simulate_parser, _add_recommend_parser, _add_serve_parser):
        add(sub)
    plan.set_defaults(func=run_plan)


# ---------------------------------------------------------------------------------------------- commands


def _router(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "policy": args.policy,
        "remote_prefill_min_tokens": args.remote_prefill_min_tokens,
        "max_prefill_queue_tokens": args.max_prefill_queue_tokens,
    }


def cmd_profile(args: argparse.Namespace) -> int:
    if args.from_trace:
        return _profile_from_traces(args)
    from duoserve.config import engine_config_from_args
    from duoserve.plan.profile import Grid, load_profile, run_profile, write_profile
    from duoserve.plan.trace import step_trace_observer

    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    grid = Grid(
        decode_batches=args.decode_batches,
        context_lens=args.context_lens,
        prefill_lens=args.prefill_lens,
        chunked_prompt_len=args.chunked_prompt_len,
        transfer_tokens=args.transfer_tokens,
        repeats=args.repeats,
    )
    config = engine_config_from_args(args)
    if args.in_process:
        write_profile(
            args.output, run_profile(config, grid, _progress, step_trace_observer(config.step_trace))
        )
    else:
        code = _profile_in_engine_env(config, grid, args.output)
        if code:
            return code
    _print_profile(load_profile(args.output), args.output)
    return 0


def _progress(message: str) -> None:
    print(f"profile: {message}", file=sys.stderr, flush=True)


def _profile_in_engine_env(config, grid, output: str) -> int:
    """Run the profile in a process spawned as the server's engine process is (its OpenMP threads sleep
    when they wait: duoserve/engine/engine_env.py), so profiled steps run as served ones do. This
    process's OpenMP already read its environment when torch loaded."""
    import multiprocessing

    from duoserve.engine.engine_env import engine_environment

    process = multiprocessing.get_context("spawn").Process(
        target=_profile_child, args=(config, grid, output), name="duoserve-plan-profile"
    )
    with engine_environment() as added:
        process.start()
    if added:
        _progress("engine environment: " + " ".join(f"{k}={v}" for k, v in added.items()))
    process.join()
    return process.exitcode or 0


def _profile_child(config, grid, output: str) -> None:
    from duoserve.plan.profile import run_profile, write_profile
    from duoserve.plan.trace import step_trace_observer

    try:
        write_profile(output, run_profile(config, grid, _progress, step_trace_observer(config.step_trace)))
    except (ValueError, OSError) as err:
        print(f"duoserve plan: error: {err}", file=sys.stderr)
        sys.exit(2)


def _profile_from_traces(args: argparse.Namespace) -> int:
    from duoserve.plan.profile import load_profile, write_profile
    from duoserve.plan.trace import format_residuals, profile_from_traces, residuals_by_regime

    transfer = load_profile(args.kv_transfer_from).kv_transfer if args.kv_transfer_from else None
    prior = load_profile(args.prior) if args.prior else None
    profile, traced, role_fits = profile_from_traces(
        args.from_trace, args.fit_time == "period", transfer, prior
    )
    write_profile(args.output, profile)
    fits = [("", profile.step_model, profile.limits, traced)]
    fits += [
        (role, profile.roles[role].step_model, profile.roles[role].limits, fit)
        for role, fit in role_fits.items()
    ]
    for role, model, limits, fit in fits:
        rows = residuals_by_regime(model, fit.shapes, fit.seconds, limits.max_num_batched_tokens)
        print(
            f"{role + ' worker: ' if role else ''}{len(fit.shapes)} traced steps; engine loop between "
            f"back-to-back steps: median {fit.median_gap * 1e3:.2f} ms "
            f"({'in' if args.fit_time == 'period' else 'not in'} the fit)"
        )
        print(format_residuals(rows))
    if not args.kv_transfer_from and not args.prior:
        print("note: no KV transfer model (a trace has none): --kv-transfer-from PROFILE for disagg")
    _print_profile(profile, args.output)
    return 0


def _print_profile(profile, output: str) -> None:
    from duoserve.plan.step_model import FEATURES

    m, fit = profile.step_model, profile.fit
    terms = " + ".join(f"{getattr(m, name):.3g}*{name}" for name in FEATURES)
    print(
        f"step seconds = {m.intercept:.4g} + {terms}  (R^2 {fit['r2']:.3f} over {fit['num_samples']} "
        f"steps, {fit['num_dropped']} dropped as noise; rmse {fit['rmse_seconds'] * 1e3:.2f} ms)"
    )
    _print_spread("", profile.spread)
    for role, own in profile.roles.items():
        terms = " + ".join(f"{getattr(own.step_model, name):.3g}*{name}" for name in FEATURES)
        print(f"{role} worker: step seconds = {own.step_model.intercept:.4g} + {terms}")
        _print_spread(f"{role} worker: ", own.spread)
    t = profile.kv_transfer
    print(f"KV transfer seconds = {t.fixed_seconds:.3g} + {t.seconds_per_token:.3g}*tokens")
    print(f"wrote {output}")


def _print_spread(prefix: str, spread: StepSpread | None) -> None:
    """A traced profile's step spread at its median, 90th and 99th percentiles, by regime."""
    from duoserve.plan.step_model import SPREAD_QUANTILES

    if spread is None:
        return
    at = [SPREAD_QUANTILES.index(q) for q in (0.5, 0.9, 0.99)]
    # (A regime of under MIN_SPREAD_STEPS steps shows the spread of all of them: step_model.step_spread.)
    regimes = ", ".join(
        f"{name} p50/p90/p99 " + "/".join(f"{ratios[i]:.2f}" for i in at)
        for name, ratios in (("kernel steps", spread.kernel), ("tiled steps", spread.tiled))
    )
    print(f"{prefix}served steps, measured / predicted: {regimes}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from duoserve.bench.report import format_summary, write_result
    from duoserve.plan.deployment import Deployment
    from duoserve.plan.objectives import Objectives
    from duoserve.plan.profile import load_profile
    from duoserve.plan.simulate import result
    from duoserve.plan.workload import workload_from_args

    deployment = Deployment.parse(args.deployment)
    objectives = Objectives.parse(args.slo) if args.slo else None
    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    doc = result(profile, deployment, workload, objectives, _router(args), args.step_trace)
    if args.label:
        doc["config"]["label"] = args.label
    config = doc["config"] | {
        "base_url": f"simulated {deployment}",
        "model": profile.engine_args.get("model"),
    }
    print(format_summary(config, doc["summary"], [], [f"profile {args.profile} ({profile.host.get('cpu')})"]))
    if args.output:
        write_result(args.output, doc)
        print(f"wrote {args.output}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from duoserve.plan.objectives import Objectives
    from duoserve.plan.profile import load_profile
    from duoserve.plan.recommend import format_recommendation, recommend
    from duoserve.plan.workload import workload_from_args

    objectives = Objectives.parse(args.slo)
    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    rec = recommend(
        profile, workload, objectives, args.percentile, args.headroom, args.max_replicas, _router(args)
    )
    print(format_recommendation(rec, objectives, args.percentile))
    if args.output:
        document = {
            "recommended": str(rec.best.deployment) if rec.best else None,
            "desired_replicas": rec.desired_replicas(),
            "slo": str(objectives),
            "percentile": args.percentile,
            "headroom": args.headroom,
            "notes": rec.notes,
            "tried": [
                {"deployment": str(c.deployment), "meets": c.meets, "missed": c.missed, "summary": c.summary}
                for c in rec.tried
            ],
        }
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
    return 0 if rec.best else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from duoserve.plan.objectives import Objectives
    from duoserve.plan.profile import load_profile
    from duoserve.plan.serve import Planner, serve_planner

    if args.interval <= 0 or args.window <= args.interval:
        raise ValueError("--interval must be > 0 and --window longer than it")
    planner = Planner(
        load_profile(args.profile),
        Objectives.parse(args.slo),
        args.percentile,
        args.headroom,
        args.max_replicas,
        args.window,
    )
    return serve_planner(planner, args.metrics_url, args.host, args.port, args.interval)


def run_plan(args: argparse.Namespace) -> int:
    """0 ok; 1 no deployment meets the SLO; 2 bad input (a clear message, never a traceback)."""
    try:
        return args.plan_func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as err:
        print(f"duoserve plan: error: {err}", file=sys.stderr)
        return 2
