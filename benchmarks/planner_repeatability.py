"""How far two measured runs of the same points land from each other, counted as the planner's goal counts.

    python benchmarks/planner_repeatability.py RUN_A RUN_B [RUN_C ...]

Each RUN is a `planner_accuracy.py --out` directory whose points were measured at the same rates (pass
`--rates`, one deployment at a time with `--only`: each deployment's own rates) and therefore the same
seeds: the same arrivals and prompts, each run on a freshly started deployment. For every pair of runs,
both ways round, it prints a markdown table of run B's measured values against run A's (p50/p99 TTFT
and ITL) with their ratio, and how many cells are within issue 13's goal (p50 within 20%, p99 within
35%): what a predictor that matched run B exactly would score against run A, i.e. how far the goal is
reachable on this machine at all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from planner_accuracy import BURSTS, LEVELS, METRICS, TRACE_ROLES  # the goal, and the points' names


def load(run: str, label: str) -> dict | None:
    path = os.path.join(run, f"{label}-measured.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def compare(first: str, second: str) -> tuple[list[str], int, int]:
    """The table rows of `second` against `first`, and (cells within the goal, cells)."""
    rows, hits, total = [], 0, 0
    for name, level, burst in itertools.product(TRACE_ROLES, LEVELS, (b for b, _ in BURSTS)):
        label = f"{name}-{level}-{burst}"
        a, b = load(first, label), load(second, label)
        if a is None or b is None:
            continue
        for key in ("request_rate", "seed", "num_prompts"):
            if a["config"].get(key) != b["config"].get(key):
                raise SystemExit(f"{label}: the runs differ in {key}: not the same point")
        cells = []
        for _, key, goal in METRICS:
            x, y = b["summary"][key], a["summary"][key]
            ratio = x / y
            within = abs(ratio - 1) <= goal
            hits, total = hits + within, total + 1
            cells.append(f"{x:.0f} / {y:.0f} ({ratio:.2f}{'' if within else ' ✗'})")
        rows.append(
            f"| {name} | {level} | {a['config']['request_rate']:g} | {burst} | " + " | ".join(cells) + " |"
        )
    return rows, hits, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="planner_accuracy.py --out directories")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give two runs or more")
    header = "| deployment | load | rate req/s | arrivals | " + " | ".join(m for m, _, _ in METRICS) + " |"
    # Both ways round: the goal's ratio (predicted / measured) is not symmetric (1 / 0.8 = 1.25).
    for first, second in itertools.permutations(args.runs, 2):
        rows, hits, total = compare(first, second)
        if not total:
            print(f"{second} against {first}: no point measured in both", file=sys.stderr)
            continue
        print(f"## {second} (measured) / {first} (measured)\n\n{header}\n|---|---|---|---|" + "---|" * 4)
        print("\n".join(rows))
        print(f"\n{hits} of {total} within the goal.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
