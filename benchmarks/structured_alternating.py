"""Structured outputs' throughput cost at one batch size, free and constrained runs alternated in one
process (issue 16's goal: under 5% at batch 32).

    python benchmarks/structured_alternating.py [--batch 32 --tokens 128 --rounds 6]

One `LLM.generate` of a batch takes a few seconds, and single runs on a shared 2-core VM swing ±10%: far
more than the cost measured. Each round runs both (free first in even rounds, the schema first in odd
ones), and the cost is 1 - median(schema) / median(free). Same prompt, schema and greedy parameters as
structured_outputs.py's throughput part (the masks where this host computes them).
"""

from __future__ import annotations

import argparse
import statistics
import time

from structured_outputs import SCHEMA

from duoserve import LLM, SamplingParams

PROMPT = "Describe people as JSON."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    llm = LLM()
    people = {"type": "array", "items": SCHEMA, "minItems": 100}  # never completes within --tokens
    params = {
        name: SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, structured_outputs=so)
        for name, so in (("free", None), ("schema", {"json": people}))
    }
    for p in params.values():  # warm up (and compile the grammar)
        llm.generate([PROMPT] * args.batch, p, use_tqdm=False)
    rates: dict[str, list[float]] = {name: [] for name in params}
    for r in range(args.rounds):
        for name in ("free", "schema") if r % 2 == 0 else ("schema", "free"):
            start = time.perf_counter()
            outputs = llm.generate([PROMPT] * args.batch, params[name], use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            rates[name].append(tokens / (time.perf_counter() - start))
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:6s} output tok/s: {runs}; median {statistics.median(values):.1f}")
    cost = 1 - statistics.median(rates["schema"]) / statistics.median(rates["free"])
    print(f"batch {args.batch}: constrained decoding costs {100 * cost:.1f}% of throughput (medians)")


if __name__ == "__main__":
    main()
