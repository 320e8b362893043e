"""Step traces: what a served engine's steps really were, and the step model fitted from them.

`--step-trace PATH` makes the engine's caller (the server's engine process, `LLM`, the CLI) give the
core a step observer (`StepTraceObserver`: duoserve/engine/step_observer.py) that writes one JSON
line per step it runs (opt-in; when off the step only tests that the observer is None). A line holds
the step's shape, computed from the scheduler's plan before the step changes any request
(`step_shape`, as the profiler and the simulator compute it), its batch (request id and tokens per
row, in the scheduler's order), when it started and how long `EngineCore.step` took. The line is
written when the next step starts (or at close), so the hook in the step is one call after
`schedule()`, and the line also holds `gap`: the wall time between this step's end and the next
step's start when the engine had work all along (a request of this step runs on in the next), i.e.
the engine loop's own cost per step (sending outputs, reading requests), which a step model fitted
from a trace's *periods* includes (`plan profile --from-trace`).

The first line is a header: the worker's limits (what the simulated scheduler needs) and its role
(prefill, decode or both), so a trace alone makes a profile; the traces of a disaggregated
deployment's workers make one profile with a step model per role. A profile fitted from a served
trace describes the engine as it runs served: in its own process, beside the API process and the
clients on the same cores, with the engine process's OpenMP environment
(duoserve/engine/engine_env.py), which the in-process profile of synthetic steps does not see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from duoserve.engine.scheduler import SchedulerOutput
from duoserve.plan.profile import (
    ROLES,
    KVTransferModel,
    Profile,
    RoleProfile,
    WorkerLimits,
    fit_summary,
    host_info,
    quantized_rows,
    worker_limits,
)
from duoserve.plan.step_model import (
    Fit,
    StepShape,
    StepSpread,
    fit_step_model,
    step_shape,
    step_spread,
    streamed_tokens,
)

if TYPE_CHECKING:
    from duoserve.engine.core import EngineCore

TRACE_KIND = "duoserve-step-trace"
TRACE_VERSION = 1
# The step fields a trace line must carry (the shape; the rest is for reading the trace); traces written
# before `sampled` and `streamed` lack them (read as 0).
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(StepShape))
OPTIONAL_SHAPE_FIELDS = ("sampled", "streamed")


@dataclass
class _Pending:
    """The step in flight: its line waits for its duration (known when the next step starts)."""

    index: int
    start: float
    line: dict[str, Any]
    request_ids: frozenset[str]


@dataclass(frozen=True)
class StepTraceObserver:
    """What `EngineCore(make_step_observer=...)` takes for `--step-trace PATH`: called with the whole
    core, it opens the trace, whose header it makes from the core (its limits, engine arguments, host)
    and the worker's `role` (prefill, decode or both: what it does for a router; `plan profile
    --from-trace` fits each role's steps apart). A picklable value, not a closure: the server hands it
    to the engine process it spawns. `{role}` and `{pid}` in the path are replaced by the role and the
    engine process's id."""

    path: str
    role: str = "both"

    def __call__(self, core: EngineCore) -> StepTraceWriter:
        limits = dataclasses.asdict(worker_limits(core, quantized_rows(core)))
        engine_args = {f.name: getattr(core.config, f.name) for f in dataclasses.fields(core.config)}
        extra = {"engine_args": engine_args, "host": host_info(core), "pid": os.getpid(), "role": self.role}
        return StepTraceWriter(self.path.replace("{role}", self.role), limits | extra)


def step_trace_observer(path: str | None, role: str = "both") -> StepTraceObserver | None:
    """The step observer for a `--step-trace` value (None: no trace is asked for)."""
    return StepTraceObserver(path, role) if path else None


class StepTraceWriter:
    """Writes the engine core's steps as JSON lines (a StepObserver: duoserve/engine/step_observer.py)."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        """`header`: the worker's limits (LIMIT_FIELDS, with its quantized row threshold) and anything
        else worth keeping with the trace (engine arguments, host)."""
        self._quantized_max_rows = int(header.get("quantized_max_rows") or 0)
        path = path.replace("{pid}", str(os.getpid()))  # a worker's own file where several share flags
        self._file: IO[str] = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (open while the engine runs)
        self._origin = time.perf_counter()
        unix = time.time()  # a step's `start` is seconds after this (to match a trace with client times)
        self._pending: _Pending | None = None
        self._count = 0
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write(
            {"kind": TRACE_KIND, "version": TRACE_VERSION, "started": now, "origin_unix": unix} | header
        )

    def record(self, plan: SchedulerOutput, start: float, previous_seconds: float) -> None:
        """Called by `EngineCore.step` after `schedule()`: `start` is this step's perf_counter start,
        `previous_seconds` how long the previous step took (the pending line's duration)."""
        ids = frozenset(s.request.request_id for s in plan.scheduled)
        pending = self._pending
        previous = (pending.line["sampled"], pending.request_ids) if pending is not None else None
        self._flush(start, previous_seconds, ids)
        if not plan.scheduled:
            return  # an idle turn (connector events only): no step to model
        shape = step_shape(plan.scheduled, self._quantized_max_rows, streamed_tokens(previous, ids))
        rows = shape.prefill_tokens + shape.decode_seqs
        line = dataclasses.asdict(shape) | {
            "kernel_rows": rows * (1 - shape.tiled),
            "tiled_rows": rows * shape.tiled,
            "chunks": [
                [s.num_new_tokens, s.request.num_computed_tokens]
                for s in plan.scheduled
                if not (s.num_new_tokens == 1 and s.request.is_decoding)
            ],
            "scheduled": [[s.request.request_id, s.num_new_tokens] for s in plan.scheduled],
            "preempted": [r.request_id for r in plan.preempted],
        }
        self._pending = _Pending(self._count, start, line, ids)
        self._count += 1

    def close(self, last_seconds: float) -> None:
        if self._file.closed:
            return
        self._flush(None, last_seconds, frozenset())
        self._file.close()

    def _flush(self, next_start: float | None, seconds: float, next_ids: frozenset[str]) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        # Back to back: a request of this step runs in the next, so the engine never waited for work.
        gap = None
        if next_start is not None and pending.request_ids & next_ids:
            gap = max(0.0, next_start - pending.start - seconds)
        timing = {
            "step": pending.index,
            "start": pending.start - self._origin,
            "seconds": seconds,
            "gap": gap,
        }
        self._write(timing | pending.line)

    def _write(self, data: dict[str, Any]) -> None:
        self._file.write(json.dumps(data, separators=(",", ":")) + "\n")


def write_trace(path: str, header: dict[str, Any], steps: Sequence[Any]) -> None:
    """A trace of steps made elsewhere (the simulator's StepRecords: start, seconds, shape, scheduled,
    preempted), in the format the engine writes, so both read and compare alike."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"kind": TRACE_KIND, "version": TRACE_VERSION} | header) + "\n")
        for index, step in enumerate(steps):
            shape = step.shape
            rows = shape.prefill_tokens + shape.decode_seqs
            line = {"step": index, "start": step.start, "seconds": step.seconds, "gap": None}
            line |= dataclasses.asdict(shape) | {
                "kernel_rows": rows * (1 - shape.tiled),
                "tiled_rows": rows * shape.tiled,
                "scheduled": [list(s) for s in step.scheduled],
                "preempted": list(step.preempted),
            }
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def step_mix(trace: Trace) -> dict[str, float]:
    """What a trace's batches were made of: to set a simulated run's steps beside the real ones."""
    shapes = [s.shape for s in trace.steps]
    with_prefill = [s for s in shapes if s.prefill_tokens]
    return {
        "steps": len(shapes),
        "prefill_steps": len(with_prefill),
        "tiled_steps": sum(s.tiled for s in shapes),
        "mean_rows": float(np.mean([s.prefill_tokens + s.decode_seqs for s in shapes])) if shapes else 0.0,
        "mean_decode_rows": float(np.mean([s.decode_seqs for s in shapes])) if shapes else 0.0,
        "prefill_tokens_per_prefill_step": (
            float(np.mean([s.prefill_tokens for s in with_prefill])) if with_prefill else 0.0
        ),
        "busy_seconds": float(sum(s.seconds for s in trace.steps)),
    }


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TracedStep:
    index: int
    start: float
    seconds: float  # EngineCore.step's wall time
    gap: float | None  # loop time to the next step when it followed at once (None: idle after, or last)
    shape: StepShape
    scheduled: tuple[tuple[str, int], ...] = ()


@dataclass
class Trace:
    path: str
    header: dict[str, Any]
    steps: list[TracedStep] = field(default_factory=list)


def read_trace(path: str) -> Trace:
    """A step trace file; ValueError (with the line) for anything that is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read step trace {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"step trace {path} is not text: {err}") from err
    lines = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not lines:
        raise ValueError(f"step trace {path} is empty")
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"step trace {path}, line {number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"step trace {path}, line {number}: not a JSON object")
        records.append((number, record))
    number, header = records[0]
    if header.get("kind") != TRACE_KIND:
        raise ValueError(
            f"{path} is not a duoserve step trace (its first line must be the header; write one with "
            "`duoserve serve --step-trace PATH`)"
        )
    if header.get("version") != TRACE_VERSION:
        raise ValueError(
            f"step trace {path}: version {header.get('version')!r}; this duoserve reads {TRACE_VERSION}"
        )
    trace = Trace(path, header)
    for number, record in records[1:]:
        trace.steps.append(_step(path, number, record))
    if not trace.steps:
        raise ValueError(f"step trace {path} has a header but no steps (did the engine run any?)")
    return trace


def _step(path: str, number: int, record: dict[str, Any]) -> TracedStep:
    record = {n: 0 for n in OPTIONAL_SHAPE_FIELDS} | record
    names = ("step", "start", "seconds", *SHAPE_FIELDS)
    missing = [n for n in names if not isinstance(record.get(n), (int, float)) or isinstance(record[n], bool)]
    gap = record.get("gap")
    if missing or not (gap is None or isinstance(gap, (int, float))):
        what = ", ".join(missing) if missing else "gap"
        raise ValueError(f"step trace {path}, line {number}: missing or non-numeric {what}")
    if record["seconds"] <= 0 or (gap is not None and gap < 0):
        raise ValueError(f"step trace {path}, line {number}: a step's seconds must be > 0 and its gap >= 0")
    shape = StepShape(**{n: record[n] for n in SHAPE_FIELDS})
    if shape.prefill_tokens + shape.decode_seqs < 1:
        raise ValueError(f"step trace {path}, line {number}: a step of no rows")
    scheduled = tuple((str(r), int(n)) for r, n in record.get("scheduled", []))
    return TracedStep(
        int(record["step"]), float(record["start"]), float(record["seconds"]), gap, shape, scheduled
    )


# ---------------------------------------------------------------------------------------------- fitting

# The worker limits a trace's header carries (WorkerLimits' fields).
LIMIT_FIELDS = (
    "num_kv_blocks",
    "block_size",
    "max_model_len",
    "max_num_batched_tokens",
    "max_num_seqs",
    "enable_prefix_caching",
    "sliding_window",
    "quantized_max_rows",
)


def trace_limits(traces: Sequence[Trace]) -> dict[str, Any]:
    """The workers' limits, which every trace must agree on (one kind of worker per profile)."""
    limits = None
    for trace in traces:
        missing = [n for n in LIMIT_FIELDS if n not in trace.header]
        if missing:
            raise ValueError(f"step trace {trace.path}: its header lacks {', '.join(missing)}")
        these = {n: trace.header[n] for n in LIMIT_FIELDS}
        if limits is not None and these != limits:
            raise ValueError(f"step trace {trace.path} comes from a worker with other limits than the others")
        limits = these
    return limits


def step_periods(trace: Trace) -> list[float]:
    """Each step's period as served: its time plus the engine loop's time to the next step. A step
    the engine went idle after (or the last) gets the median loop time of the back-to-back ones."""
    gaps = [s.gap for s in trace.steps if s.gap is not None]
    typical = float(np.median(gaps)) if gaps else 0.0
    return [s.seconds + (s.gap if s.gap is not None else typical) for s in trace.steps]


@dataclass(frozen=True)
class TraceFit:
    fit: Fit
    shapes: list[StepShape]
    seconds: list[float]  # what was fitted (periods or step times)
    median_gap: float  # the engine loop's time between back-to-back steps
    spread: StepSpread | None = None  # how the traced steps spread around the fitted model


# With a prior (a synthetic profile's measured steps), its steps together weigh this fraction of the
# traced ones. A served run's steps span few directions of the feature space (one prompt length: the
# prefill attention grows with the prefill rows, the decode context with the decode rows), so alone they
# leave some coefficients to chance (a smoke trace put all of a step's time on attention); the prior's
# grid decides those directions, the trace the ones it measures.
PRIOR_WEIGHT = 0.2


def fit_traces(traces: Sequence[Trace], periods: bool = True, prior: Sequence[list[float]] = ()) -> TraceFit:
    """The step model over every traced step (its period, or with periods=False its step time), with
    `prior` steps ([*StepShape fields, seconds], a profile's samples) weighing PRIOR_WEIGHT in all."""
    shapes, seconds, gaps = [], [], []
    for trace in traces:
        shapes += [s.shape for s in trace.steps]
        seconds += step_periods(trace) if periods else [s.seconds for s in trace.steps]
        gaps += [s.gap for s in trace.steps if s.gap is not None]
    weights = [1.0] * len(shapes)
    if prior:
        each = PRIOR_WEIGHT * len(shapes) / len(prior)
        prior_shapes = [StepShape(*row[:-1]) for row in prior]
        fit = fit_step_model(
            shapes + prior_shapes, seconds + [row[-1] for row in prior], weights + [each] * len(prior)
        )
    else:
        fit = fit_step_model(shapes, seconds, weights)
    spread = step_spread(fit.model, shapes, seconds)
    return TraceFit(fit, shapes, seconds, float(np.median(gaps)) if gaps else 0.0, spread)


def regime(shape: StepShape, max_num_batched_tokens: int) -> str:
    """Which kind of step: what a step model's form must get right separately."""
    rows = shape.prefill_tokens + shape.decode_seqs
    kind = "tiled" if shape.tiled else "kernel"
    mix = "decode" if not shape.prefill_tokens else "prefill" if not shape.decode_seqs else "mixed"
    full = " at budget" if rows >= max_num_batched_tokens else ""
    return f"{kind} {mix}{full}"


def residuals_by_regime(
    model, shapes: Sequence[StepShape], seconds: Sequence[float], max_num_batched_tokens: int
) -> list[dict[str, Any]]:
    """Per regime: steps, median measured, and the relative error of the model (p10, p50, p90)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for shape, measured in zip(shapes, seconds, strict=True):
        groups.setdefault(regime(shape, max_num_batched_tokens), []).append((model.seconds(shape), measured))
    rows = []
    for name in sorted(groups):
        pairs = np.array(groups[name])
        error = pairs[:, 0] / pairs[:, 1] - 1  # predicted / measured - 1
        rows.append(
            {
                "regime": name,
                "steps": len(pairs),
                "median_ms": float(np.median(pairs[:, 1]) * 1e3),
                "error_p10": float(np.percentile(error, 10)),
                "error_p50": float(np.median(error)),
                "error_p90": float(np.percentile(error, 90)),
            }
        )
    return rows


def format_residuals(rows: list[dict[str, Any]]) -> str:
    lines = [
        "regime                     steps  median ms   error p10    p50    p90  (predicted/measured - 1)"
    ]
    for r in rows:
        lines.append(
            f"{r['regime']:<26} {r['steps']:>5} {r['median_ms']:>10.1f}   {r['error_p10']:>+8.1%} "
            f"{r['error_p50']:>+6.1%} {r['error_p90']:>+6.1%}"
        )
    return "\n".join(lines)


def trace_role(trace: Trace) -> str:
    """The role of the worker that wrote it (`duoserve serve --role`; traces before roles: both)."""
    role = trace.header.get("role", "both")
    if role not in ("both", *ROLES):
        raise ValueError(f"step trace {trace.path}: role {role!r} is none of both, {', '.join(ROLES)}")
    return role


def profile_from_traces(
    paths: Sequence[str], periods: bool = True, kv_transfer=None, prior=None
) -> tuple[Profile, TraceFit, dict[str, TraceFit]]:
    """`duoserve plan profile --from-trace`: a profile whose step model is fitted to served steps.

    Traces of a disaggregated deployment's workers (their header's role: prefill, decode) are fitted
    per role, each with its own limits (Profile.roles: the simulator gives each worker its role's). The
    profile's own step model, for colocated workers, is fitted to the colocated (role both) traces, or
    without any to every traced step, with the decode worker's limits (it prefills and decodes too).

    Returns the profile, the fit of its own step model and those of its roles (for their residuals).
    `prior`: a synthetic profile of the same worker, whose measured steps settle what the traces' steps
    cannot tell apart (PRIOR_WEIGHT, in every fit). The KV transfer model is not in a trace:
    `kv_transfer`, else the prior's, else none."""
    if not paths:
        raise ValueError("--from-trace needs at least one step trace")
    traces = [read_trace(p) for p in paths]
    by_role: dict[str, list[Trace]] = {}
    for trace in traces:
        by_role.setdefault(trace_role(trace), []).append(trace)
    if prior is not None and not prior.samples:
        raise ValueError("the prior profile holds no measured steps")
    prior_samples = prior.samples if prior is not None else ()

    def fitted(group: list[Trace]) -> tuple[WorkerLimits, TraceFit]:
        limits = WorkerLimits(**trace_limits(group))
        if prior is not None and prior.limits.quantized_max_rows != limits.quantized_max_rows:
            raise ValueError(
                "the prior profile's worker has another quantized row threshold than the trace's"
            )
        return limits, fit_traces(group, periods, prior_samples)

    roles = {role: fitted(by_role[role]) for role in ROLES if role in by_role}
    if "both" in by_role:
        limits, traced = fitted(by_role["both"])
    else:
        limits = (roles.get("decode") or roles["prefill"])[0]
        traced = fit_traces(traces, periods, prior_samples)
    if any(role_limits.block_size != limits.block_size for role_limits, _ in roles.values()):
        raise ValueError("the traces come from workers with other block sizes")

    def summary(fit: TraceFit) -> dict[str, float]:
        return fit_summary(fit.fit) | {
            "loop_gap_seconds": fit.median_gap,
            "prior_samples": len(prior_samples),
        }

    kv_transfer = kv_transfer or (prior.kv_transfer if prior is not None else None)
    first = traces[0].header
    profile = Profile(
        step_model=traced.fit.model,
        limits=limits,
        kv_transfer=kv_transfer or KVTransferModel(),
        engine_args=first.get("engine_args", {}),
        host=first.get("host", {}),
        fit=summary(traced),
        grid={
            "from_traces": list(paths),
            "roles": {role: [t.path for t in group] for role, group in by_role.items()},
            "fitted": "step periods (step + engine loop to the next step)" if periods else "step times",
        },
        samples=[[*s.values(), t] for s, t in zip(traced.shapes, traced.seconds, strict=True)],
        roles={
            role: RoleProfile(fit.fit.model, lim, summary(fit), fit.spread)
            for role, (lim, fit) in roles.items()
        },
        spread=traced.spread,
    )
    return profile, traced, {role: fit for role, (_, fit) in roles.items()}


def slice_trace(path: str, start_unix: float, end_unix: float, out_path: str) -> int:
    """The steps of trace `path` that started within [start_unix, end_unix) (wall clock), written as a
    trace of their own (same header): e.g. one benchmark point's steps out of a server's whole run.
    Returns how many steps it holds."""
    trace = read_trace(path)  # checks it
    origin = trace.header.get("origin_unix")
    if not isinstance(origin, (int, float)):
        raise ValueError(f"step trace {path} has no origin_unix: it cannot be matched to wall-clock times")
    with open(path, encoding="utf-8") as f:
        header, *lines = [line for line in f.read().splitlines() if line.strip()]
    kept = [line for line in lines if start_unix <= origin + json.loads(line)["start"] < end_unix]
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in [header, *kept]))
    return len(kept)
