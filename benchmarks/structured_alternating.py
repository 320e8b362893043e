"""Structured outputs' throughput cost at one batch size, free and constrained runs alternated in one
process (issue 16's goal: under 5% at batch 32).

    python benchmarks/structured_alternating.py [--batch 32 --tokens 128 --rounds 6]

One `LLM.generate` of a batch takes a few seconds, and single runs on a shared 2-core VM swing ±10%: far
more than the cost measured. Each round runs every variant (in a rotated order), and a variant's cost is
1 - median(its runs) / median(free). Variants: free (unconstrained); schema (the engine's default: rows
sampled first, a mask computed only where the grammar refuses the token or forces bytes); schema-masked
(every constrained row masked before sampling, `StructuredOutputs.sample_first = False`). Same prompt,
schema and greedy parameters as structured_outputs.py's throughput part (the masks where this host
computes them).
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
    structured = llm.engine.core.structured
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    schema = SamplingParams(
        temperature=0, max_tokens=args.tokens, ignore_eos=True, structured_outputs={"json": people}
    )
    variants = {"free": (free, True), "schema": (schema, True), "schema-masked": (schema, False)}

    def run(name: str) -> float:
        params, structured.sample_first = variants[name]
        start = time.perf_counter()
        outputs = llm.generate([PROMPT] * args.batch, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return tokens / (time.perf_counter() - start)

    for name in variants:  # warm up (and compile the grammar)
        run(name)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    before = (structured.stats.sampled_first_rows, structured.stats.refused_rows)
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(run(name))
    sampled_first = structured.stats.sampled_first_rows - before[0]
    refused = structured.stats.refused_rows - before[1]
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:13s} output tok/s: {runs}; median {statistics.median(values):.1f}")
    for name in names[1:]:
        cost = 1 - statistics.median(rates[name]) / statistics.median(rates["free"])
        print(f"batch {args.batch}, {name}: costs {100 * cost:.1f}% of throughput (medians)")
    if sampled_first:
        print(
            f"rows sampled first: {sampled_first}, of which refused (masked, sampled again): {refused} "
            f"({100 * refused / sampled_first:.1f}%)"
        )


if __name__ == "__main__":
    main()
