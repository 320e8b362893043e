"""Step time as a function of the step's shape: the features, the linear model, and its fit.

One engine step runs every scheduled token through the weights (cost per token, prefill or decode
alike, plus a fixed cost per step for reading the weights at all), then attention: a decode reads its
whole context from the paged cache, a prefill chunk attends over its own tokens and the context before
them (quadratic in the chunk). So

    seconds = intercept + prefill_tokens * a + decode_seqs * b + decode_context * c + prefill_attention * d
              + tiled * e

where `tiled` is 1 for a step of more rows than the worker's quantized threshold: such a step dequantizes
every weight tile once (a fixed cost whatever its rows) before the GEMM, while smaller steps read the
4/8-bit codes. Without it the fit spread that cost over prefill tokens and attention, and simulated
prefill chunks cost several times their real time on a float32 AVX2 worker (BENCHMARKS.md).

with every coefficient >= 0, fitted by least squares over steps measured on the real engine
(`duoserve plan profile`). The features are computed from the scheduler's own output, so the profiler
and the simulator describe a step the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from duoserve.engine.scheduler import ScheduledRequest


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int = 0  # tokens of prompt chunks (or recomputation after a preemption)
    decode_seqs: int = 0  # requests decoding one token
    decode_context: int = 0  # tokens of KV the decodes read (sum of their context lengths)
    prefill_attention: float = 0.0  # query x key pairs of the prefill chunks, in thousands
    tiled: int = 0  # 1: more rows than the quantized threshold (weights dequantized in tiles this step)

    def features(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]


FEATURES = tuple(f.name for f in fields(StepShape))


def step_shape(scheduled: Sequence[ScheduledRequest], quantized_max_rows: int = 0) -> StepShape:
    """The shape of a step, from the scheduler's output before the step updates any request;
    `quantized_max_rows`: the worker's threshold (0: its weights are dense, no step is tiled)."""
    prefill = decodes = context = 0
    attention = 0.0
    for s in scheduled:
        request = s.request
        start = request.num_computed_tokens
        if s.num_new_tokens == 1 and request.is_decoding:
            decodes += 1
            context += start + 1
        else:
            n = s.num_new_tokens
            prefill += n
            attention += n * (start + (n + 1) / 2) / 1000.0
    tiled = int(0 < quantized_max_rows < prefill + decodes)
    return StepShape(prefill, decodes, context, attention, tiled)


@dataclass(frozen=True)
class StepModel:
    """seconds = intercept + sum(coefficient * feature); every coefficient >= 0."""

    intercept: float
    prefill_tokens: float = 0.0
    decode_seqs: float = 0.0
    decode_context: float = 0.0
    prefill_attention: float = 0.0
    tiled: float = 0.0

    def seconds(self, shape: StepShape) -> float:
        return self.intercept + sum(
            getattr(self, name) * value for name, value in zip(FEATURES, shape.features(), strict=True)
        )

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StepModel:
        names = ("intercept", *FEATURES)
        data = {"tiled": 0.0} | data  # profiles made before the feature existed
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
    r2: float
    rmse: float  # seconds
    num_samples: int


def fit_step_model(shapes: Sequence[StepShape], seconds: Sequence[float]) -> Fit:
    """Non-negative least squares (features dropped while their coefficient comes out negative).

    Columns are scaled to unit norm first: token counts run to thousands, the others to tens.
    """
    if len(shapes) < 2 or len(shapes) != len(seconds):
        raise ValueError("fitting a step model needs at least two measured steps")
    x = np.array([[1.0, *s.features()] for s in shapes])
    y = np.asarray(seconds, dtype=float)
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    coef = np.zeros(x.shape[1])
    while active:
        cols = x[:, active]
        norms = np.linalg.norm(cols, axis=0)
        solution, *_ = np.linalg.lstsq(cols / norms, y, rcond=None)
        solution /= norms
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    predicted = x @ coef
    residual = y - predicted
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    model = StepModel(*coef.tolist())
    return Fit(model, r2, float(np.sqrt((residual**2).mean())), len(shapes))
