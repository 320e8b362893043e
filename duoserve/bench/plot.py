"""`duoserve bench plot`: compare result files as latency percentiles and throughput against concurrency.

Runs are grouped into one line per label (--label at bench time; default host/model). The x value is
the configured --concurrency, or, for uncapped request-rate runs, the measured mean number of requests
in flight. vLLM's own result JSON (metrics at top level, `max_concurrency`) is read too.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from typing import Any

from duoserve.bench.report import load_result

# (panel title, summary key stem); latency panels draw p50 solid and p99 dashed.
_LATENCY_PANELS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"))


class PlotError(RuntimeError):
    pass


@dataclass
class RunPoint:
    label: str
    x: float
    summary: dict[str, Any]


def load_point(path: str) -> RunPoint | None:
    doc = load_result(path)
    config = doc.get("config", doc)
    summary = doc.get("summary", doc)
    label = config.get("label") or config.get("model") or config.get("model_id") or path
    x = config.get("concurrency") or config.get("max_concurrency") or summary.get("mean_concurrency")
    if not x:
        warnings.warn(f"{path}: no concurrency to plot against; skipped", stacklevel=2)
        return None
    return RunPoint(str(label), float(x), summary)


def group_points(points: list[RunPoint]) -> dict[str, list[RunPoint]]:
    groups: dict[str, list[RunPoint]] = collections.defaultdict(list)
    for p in points:
        groups[p.label].append(p)
    return {label: sorted(ps, key=lambda p: p.x) for label, ps in groups.items()}


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotError(
            "`duoserve bench plot` needs matplotlib: pip install matplotlib (or the duoserve[plot] extra)"
        ) from e
    return Figure


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _series(points: list[RunPoint], key: str) -> tuple[list[float], list[float]]:
    pairs = [(p.x, p.summary.get(key)) for p in points]
    kept = [(x, y) for x, y in pairs if _is_number(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _style_axes(ax: Any, xs: list[float]) -> None:
    from matplotlib.ticker import NullLocator, ScalarFormatter

    # Concurrency sweeps are usually powers of two; a log2 axis spaces them evenly.
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    ticks = sorted(set(xs))
    if len(ticks) <= 12:
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("concurrency")
    ax.set_ylim(bottom=0)  # latency and throughput differences read honestly from a zero baseline
    ax.grid(True, alpha=0.3)


def plot_runs(paths: list[str], out: str, title: str | None = None) -> None:
    points = [p for p in map(load_point, paths) if p is not None]
    if not points:
        raise PlotError("no plottable result files")
    groups = group_points(points)
    fig = _figure_class()(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    xs = [p.x for p in points]
    for ax, (name, key) in zip(axes, _LATENCY_PANELS, strict=False):
        for i, (label, pts) in enumerate(groups.items()):
            color = f"C{i % 10}"
            ax.plot(*_series(pts, f"p50_{key}_ms"), "o-", color=color, label=f"{label} p50")
            ax.plot(*_series(pts, f"p99_{key}_ms"), "s--", color=color, label=f"{label} p99")
        ax.set_title(f"{name} (ms)")
        _style_axes(ax, xs)
    tput = axes[3]
    for i, (label, pts) in enumerate(groups.items()):
        tput.plot(*_series(pts, "output_throughput"), "o-", color=f"C{i % 10}", label=label)
    tput.set_title("output throughput (tok/s)")
    _style_axes(tput, xs)
    axes[0].legend(fontsize="small")
    tput.legend(fontsize="small")
    fig.suptitle(title or "duoserve bench")
    fig.savefig(out, dpi=100)
