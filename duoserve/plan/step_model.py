"""Step time as a function of the step's shape: the features, the linear model, and its fit.

One engine step runs every scheduled row (a prompt token or a decoding request) through the weights,
then attention: a decode reads its whole context from the paged cache, a prefill chunk attends over
its own tokens and the context before them (quadratic in the chunk). How much a row costs depends on
which kernel the step's row count picks: a step of up to the worker's quantized threshold reads the
4/8-bit codes per row (on an AVX512-BF16 host, duoserve's fused kernels: compute-bound, ~0.48 ms a row
for SmolLM2 on 2 Zen 5 threads, 6.4 ms for a 1-row step), a larger step dequantizes every weight tile
once (a fixed cost whatever its rows) and runs a GEMM (~0.37 ms a row there). Only the rows that sample
(decodes, and chunks that end their prompt) go through the LM head (an int8 49152 x 576 matrix for
SmolLM2, a fifth of its weights): a 128-token prompt chunk pays it once, a 32-row decode step 32 times.
And a served engine shares its cores with the API process (and, when measured, the client), which
stream the tokens the previous step emitted while this step runs: on 2 cores their CPU time lands on
one of the step's threads (measured: 0.2 ms of API process and 0.25 ms of `duoserve bench` CPU per
token; decode steps of 30-34 rows ran 33-41 ms served, median of two runs, and 24-27 ms in-process).
So

    seconds = intercept + kernel_rows * a + tiled_rows * b + decode_context * c + prefill_attention * d
              + tiled * e + sampled_rows * f + streamed * g

where `tiled` is 1 for a step of more rows than the threshold, `tiled_rows` are its rows and
`kernel_rows` those of any other step (all steps of a dense worker), `sampled_rows` the rows that
sample, and `streamed` the tokens the previous step emitted when this one followed it at once (a request
of the previous step runs on in this one: the engine never waited for work in between). An in-process
profile has no front end (streamed is 0 there); a fit of a served engine's trace learns `g`. Splitting
prefill and decode rows instead (the first model) let the per-row cost of one regime leak into the
other: 16-token chunks were predicted 25% fast, and a fit over a noisy profile put 137 ms into the
intercept of a 34 ms decode step.

Every coefficient is >= 0. The fit minimises *relative* error, so 30 ms decode steps weigh as much as
2 s prefill steps (ITL is made of the former, TTFT of the latter), and drops steps that ran far slower
than the rest predict: on a shared machine, noise only ever adds time (BENCHMARKS.md, planner). The
features are computed from the scheduler's own output, so the profiler and the simulator describe a
step the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from duoserve.engine.scheduler import ScheduledRequest


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int = 0  # tokens of prompt chunks (or recomputation after a preemption)
    decode_seqs: int = 0  # requests decoding one token
    decode_context: int = 0  # tokens of KV the decodes read (sum of their context lengths)
    prefill_attention: float = 0.0  # query x key pairs of the prefill chunks, in thousands
    tiled: int = 0  # 1: more rows than the quantized threshold (weights dequantized in tiles this step)
    # Added later: traces and profiles written before have neither (read as 0: no LM head term, nothing
    # streamed, which a refit then leaves at 0).
    sampled: int = 0  # rows that sample a token (decodes, chunks that end their prompt): the LM head's rows
    streamed: int = 0  # tokens the previous step emitted, streamed by the front end while this one runs

    def values(self) -> list[float]:
        """The shape's fields, in order (how a profile stores a measured step)."""
        return [float(getattr(self, f.name)) for f in fields(self)]

    def features(self) -> list[float]:
        """The step model's features, in FEATURES order."""
        rows = float(self.prefill_tokens + self.decode_seqs)
        tiled = float(self.tiled)
        return [
            rows * (1 - tiled),
            rows * tiled,
            float(self.decode_context),
            self.prefill_attention,
            tiled,
            float(self.sampled),
            float(self.streamed),
        ]


FEATURES = (
    "kernel_rows",
    "tiled_rows",
    "decode_context",
    "prefill_attention",
    "tiled",
    "sampled_rows",
    "streamed",
)
# Coefficients a step model written before them may lack (read as 0).
OPTIONAL_FEATURES = ("sampled_rows", "streamed")


def step_shape(
    scheduled: Sequence[ScheduledRequest], quantized_max_rows: int = 0, streamed: int = 0
) -> StepShape:
    """The shape of a step, from the scheduler's output before the step updates any request;
    `quantized_max_rows`: the worker's threshold (0: its weights are dense, no step is tiled);
    `streamed`: the tokens the previous step emitted, when this one follows it at once (`streamed_tokens`;
    0 in-process, where no front end streams them)."""
    prefill = decodes = context = sampled = 0
    attention = 0.0
    for s in scheduled:
        request = s.request
        start = request.num_computed_tokens
        sampled += s.samples
        if s.num_new_tokens == 1 and request.is_decoding:
            decodes += 1
            context += start + 1
        else:
            n = s.num_new_tokens
            prefill += n
            attention += n * (start + (n + 1) / 2) / 1000.0
    tiled = int(0 < quantized_max_rows < prefill + decodes)
    return StepShape(prefill, decodes, context, attention, tiled, sampled, streamed)


def streamed_tokens(previous: tuple[int, frozenset[str]] | None, request_ids: frozenset[str]) -> int:
    """What the front end streams while a step runs: the tokens the previous step emitted (`previous`:
    its sampled rows and request ids), when a request of that step runs on in this one (the engine went
    on at once; after an idle turn the front end had the cores to itself)."""
    if previous is None or not previous[1] & request_ids:
        return 0
    return previous[0]


@dataclass(frozen=True)
class StepModel:
    """seconds = intercept + sum(coefficient * feature); every coefficient >= 0."""

    intercept: float
    kernel_rows: float = 0.0
    tiled_rows: float = 0.0
    decode_context: float = 0.0
    prefill_attention: float = 0.0
    tiled: float = 0.0
    sampled_rows: float = 0.0
    streamed: float = 0.0

    def seconds(self, shape: StepShape) -> float:
        return self.intercept + sum(
            getattr(self, name) * value for name, value in zip(FEATURES, shape.features(), strict=True)
        )

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StepModel:
        names = ("intercept", *FEATURES)
        data = {n: 0.0 for n in OPTIONAL_FEATURES} | dict(data)
        missing = [n for n in names if not isinstance(data.get(n), (int, float))]
        if missing:
            raise ValueError(f"the step model lacks numeric {', '.join(missing)}")
        model = cls(**{n: float(data[n]) for n in names})
        if any(getattr(model, n) < 0 for n in names) or not any(getattr(model, n) for n in names):
            raise ValueError("the step model's coefficients must be >= 0, and a step must take time")
        return model


@dataclass(frozen=True)
class Fit:
    model: StepModel
    r2: float  # over the steps kept
    rmse: float  # seconds, over the steps kept
    num_samples: int  # steps kept
    num_dropped: int = 0  # steps that ran far slower than the rest predict (noise)


# A step is noise when it ran this many robust deviations (and at least OUTLIER_FLOOR) slower than the
# fit of the others predicts. Profiles measured on a quiet 2-core machine keep ~95% of their steps.
OUTLIER_DEVIATIONS = 3.0
OUTLIER_FLOOR = 0.10
MAX_REFITS = 5


def fit_step_model(
    shapes: Sequence[StepShape], seconds: Sequence[float], weights: Sequence[float] | None = None
) -> Fit:
    """Non-negative least squares on relative error, refitted without the steps it finds too slow.
    `weights`: how much each step counts (default 1 each), e.g. a prior's steps less than traced ones."""
    if len(shapes) < 2 or len(shapes) != len(seconds):
        raise ValueError("fitting a step model needs at least two measured steps")
    x = np.array([[1.0, *s.features()] for s in shapes])
    y = np.asarray(seconds, dtype=float)
    if (y <= 0).any():
        raise ValueError("measured step times must be > 0")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    keep = np.ones(len(y), dtype=bool)
    for _ in range(MAX_REFITS):
        coef = _nnls(x[keep], y[keep], weights=w[keep] / y[keep])
        slower = _relative_residual(x @ coef, y)
        spread = 1.4826 * float(np.median(np.abs(slower[keep] - np.median(slower[keep]))))
        new_keep = slower <= max(OUTLIER_DEVIATIONS * spread, OUTLIER_FLOOR)
        if (new_keep == keep).all() or new_keep.sum() < max(2, len(y) // 2):
            break
        keep = new_keep
    residual = y[keep] - x[keep] @ coef
    total = float(((y[keep] - y[keep].mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    rmse = float(np.sqrt((residual**2).mean()))
    return Fit(StepModel(*coef.tolist()), r2, rmse, int(keep.sum()), int((~keep).sum()))


def _relative_residual(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """How much slower each step ran than predicted, as a fraction of the prediction."""
    return (measured - predicted) / np.maximum(predicted, 1e-9)


def _nnls(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares with every coefficient >= 0 (features dropped while their coefficient
    comes out negative). Columns are scaled to unit norm first: token counts run to thousands, the
    others to tens."""
    coef = np.zeros(x.shape[1])
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    while active:
        cols = x[:, active] * weights[:, None]
        norms = np.linalg.norm(cols, axis=0)
        solution, *_ = np.linalg.lstsq(cols / norms, y * weights, rcond=None)
        solution /= norms
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


# How a served engine's steps spread around the step model: the ratio measured / predicted of a trace's
# steps at these quantiles (every step, the slow ones the fit dropped too). Served, the same shape takes
# longer now and then (the API process, the client, another process on 2 cores): served 1P+1D decode
# steps of 1-4 rows ran 9.3 ms at the median and 17-25 ms at the 99th percentile, and a 40-request
# point's p99 ITL is made of those. A simulator with the model's time alone predicted p99 ITL 0.3-0.6x.
# The draws are not normalised to a mean of 1: the model is fitted to the typical step (relative error,
# slow steps dropped), while a worker's capacity is set by its mean step, 2-9% above the model's in the
# served sweeps' spreads (BENCHMARKS.md, planner); normalised (one pooled spread then), four runs gave
# 39, 37, 41 and 40 cells of 48 against 46, 41, 43 and 38.
SPREAD_QUANTILES = (*(i / 20 for i in range(20)), 0.99)
# A regime's own spread needs this many steps; with fewer it takes the spread of all the steps.
MIN_SPREAD_STEPS = 20


@dataclass(frozen=True)
class StepSpread:
    """The ratios measured / predicted at SPREAD_QUANTILES, apart for steps through the row kernels and
    tiled steps: an interruption adds time rather than a fraction of it, so the short steps spread more.
    In a served sweep's closed-loop runs (2 Zen 5 cores) kernel steps (7-35 ms) had a 90th percentile of
    1.15-1.52 and a 99th of 1.7-2.6, tiled ones (80-450 ms) 1.05-1.21 and 1.1-1.6 (one disturbed run of
    another sweep: tiled steps to 2.4x); one pooled spread gave the long steps, which make a worker's
    capacity, the short steps' tail. Over seven runs (BENCHMARKS.md, planner) the spread by regime scored
    41.4 cells of 48 on average, one pooled spread 40.6, none 38.0."""

    kernel: tuple[float, ...]
    tiled: tuple[float, ...]

    def ratio(self, shape: StepShape, u: float) -> float:
        """The ratio at quantile u (in [0, 1]) for a step of this shape, interpolated."""
        spread = self.tiled if shape.tiled else self.kernel
        return float(np.interp(min(u, SPREAD_QUANTILES[-1]), SPREAD_QUANTILES, spread))

    def to_json(self) -> dict[str, list[float]]:
        return {"kernel": list(self.kernel), "tiled": list(self.tiled)}

    @classmethod
    def from_json(cls, data: Any) -> StepSpread:
        """A stored spread, checked: per regime, len(SPREAD_QUANTILES) positive non-decreasing ratios."""
        if not isinstance(data, dict) or set(data) != {"kernel", "tiled"}:
            raise ValueError("step_spread must map 'kernel' and 'tiled' to ratios")
        for ratios in data.values():
            if (
                not isinstance(ratios, list)
                or len(ratios) != len(SPREAD_QUANTILES)
                or not all(isinstance(r, (int, float)) and r > 0 for r in ratios)
                or any(b < a for a, b in zip(ratios[:-1], ratios[1:], strict=True))
            ):
                raise ValueError(
                    f"step_spread must have {len(SPREAD_QUANTILES)} positive non-decreasing ratios per regime"
                )
        return cls(tuple(map(float, data["kernel"])), tuple(map(float, data["tiled"])))


def step_spread(model: StepModel, shapes: Sequence[StepShape], seconds: Sequence[float]) -> StepSpread:
    """How these steps' measured times spread around the model's, by regime (what the simulator draws
    from); a regime of under MIN_SPREAD_STEPS steps takes the spread of all of them."""
    predicted = np.array([model.seconds(s) for s in shapes])
    ratios = np.asarray(seconds, dtype=float) / np.maximum(predicted, 1e-9)
    tiled = np.array([bool(s.tiled) for s in shapes], dtype=bool)
    pooled = tuple(float(r) for r in np.quantile(ratios, SPREAD_QUANTILES))

    def of(mask: np.ndarray) -> tuple[float, ...]:
        if mask.sum() < MIN_SPREAD_STEPS:
            return pooled
        return tuple(float(r) for r in np.quantile(ratios[mask], SPREAD_QUANTILES))

    return StepSpread(of(~tiled), of(tiled))
