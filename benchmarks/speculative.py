"""Speculative decoding: output tokens/s with and without speculation, one run, same prompts.

    python benchmarks/speculative.py --batch-sizes 1 4 16 --max-tokens 128

Two workloads on the default model (SmolLM2-135M-Instruct), chat template applied:
- grounded: repeat, correct or summarise a passage given in the prompt (output copies the input:
  where n-gram prompt lookup shines);
- chat: open-ended questions (little to copy).
For each batch size B, B conversations run concurrently (LLM.chat on B prompts; at B = 1, three
prompts one after the other), greedy; every configuration (plain, n-gram, draft) runs the same
prompts in one process, interleaved and repeated (the fastest run counts), so ratios are comparable
on a noisy shared machine. Greedy outputs must match plain decoding: mismatches are counted.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams

PASSAGES = [
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. Every night the "
    "keeper climbed the narrow stairs, trimmed the wick and polished the great lens until it shone. Ships "
    "passing in the dark trusted its beam to guide them around the rocks. When the keeper grew old, the "
    "town installed an electric lamp, and the lighthouse no longer needed anyone to climb its stairs.",
    "Photosynthesis is the process by which green plants turn light into chemical energy. Inside the "
    "leaves, chlorophyll absorbs sunlight and uses it to split water into oxygen and hydrogen. The "
    "hydrogen is combined with carbon dioxide from the air to make sugar, which the plant uses to grow. "
    "The oxygen is released into the atmosphere, where animals and people breathe it.",
    "Our team meeting is moved from Tuesday to Thursday at ten in the morning. Please bring the latest "
    "sales figures and a short summary of your projects. The meeting will take place in the large "
    "conference room on the third floor. If you cannot attend, send your summary to Maria before "
    "Wednesday evening so that she can present it for you.",
]
TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Correct any mistakes in the following text and write it out in full:\n\n{}",
    "Summarize the following text in a few sentences:\n\n{}",
]
CHAT = [
    "Write a short story about a robot who learns to paint.",
    "What are some good ways to stay productive when working from home?",
    "Explain why the sky is blue to a ten year old.",
    "Give me ideas for a birthday party for my grandmother.",
    "What should I pack for a week-long hiking trip?",
    "Describe your ideal weekend.",
    "How do I start learning to play the guitar?",
    "Write a poem about the ocean at night.",
    "What are the pros and cons of electric cars?",
    "Suggest a healthy breakfast and explain why it is healthy.",
    "Tell me about an interesting period in history.",
    "How can I become a better listener?",
    "Invent a new board game and describe its rules.",
    "What makes a good teacher?",
    "Plan a three day trip to a city by the sea.",
    "Why do people enjoy music?",
]


def workloads() -> dict[str, list[str]]:
    grounded = [task.format(passage) for passage in PASSAGES for task in TASKS]
    return {"grounded": grounded, "chat": CHAT}


def conversations(prompts: list[str], count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(count)]


def run(
    llm: LLM, convs: list[list[dict]], params: SamplingParams, batch: int
) -> tuple[float, list[list[int]]]:
    """Run the conversations `batch` at a time; (seconds, output token ids)."""
    tokens = []
    start = time.perf_counter()
    for i in range(0, len(convs), batch):
        tokens += [o.outputs[0].token_ids for o in llm.chat(convs[i : i + batch], params, use_tqdm=False)]
    return time.perf_counter() - start, tokens


def spec_counters(llm: LLM) -> tuple[float, float, float]:
    stats = llm.engine.core.stats()
    return tuple(
        stats.get(f"spec_decode_num_{key}", 0.0) for key in ("drafts", "draft_tokens", "accepted_tokens")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument(
        "--draft-num-layers", type=int, default=10, help="layers of the self-speculative draft"
    )
    parser.add_argument("--speculative-max-num-seqs", type=int, default=None, help="default: the engine's")
    parser.add_argument("--configs", nargs="+", default=["plain", "ngram", "draft"])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each configuration")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()

    common = dict(
        max_num_seqs=max(args.batch_sizes),
        num_speculative_tokens=args.num_speculative_tokens,
        num_threads=args.num_threads,
        kv_cache_memory=1 << 30,  # three engines in one process: 1 GiB of KV each is plenty here
    )
    if args.speculative_max_num_seqs is not None:
        common["speculative_max_num_seqs"] = args.speculative_max_num_seqs
    engines = {
        "plain": dict(),
        "ngram": dict(speculative="ngram"),
        "draft": dict(speculative="draft", draft_num_layers=args.draft_num_layers),
    }
    llms = {name: LLM(**common, **engines[name]) for name in args.configs}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for llm in llms.values():  # first-call costs (allocator, thread pools) out of the timings
        run(llm, conversations(CHAT, 2), SamplingParams(temperature=0, max_tokens=8), 2)
    print(
        f"k={args.num_speculative_tokens}, max_tokens={args.max_tokens}, "
        f"draft layers={args.draft_num_layers}, best of {args.repeats} interleaved runs"
    )
    print("| workload | batch | config | output tok/s | vs plain | acceptance | mean accepted len | same |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, prompts in workloads().items():
        for batch in args.batch_sizes:
            # At batch 1, the first three prompts one after the other (grounded: the three tasks).
            convs = conversations(prompts, max(batch, 3))
            results = measure(llms, convs, params, batch, args.repeats)
            reference, plain_rate = results["plain"].tokens, results["plain"].rate
            for name, result in results.items():
                same = sum(a == b for a, b in zip(result.tokens, reference, strict=True))
                print(
                    f"| {workload} | {batch} | {name} | {result.rate:.1f} | {result.rate / plain_rate:.2f}x "
                    f"| {result.acceptance} | {result.mean_accepted_length} | {same}/{len(convs)} |",
                    flush=True,
                )


@dataclass
class Result:
    rate: float  # output tokens/s of the fastest run
    tokens: list[list[int]]
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0

    @property
    def acceptance(self) -> str:
        return f"{self.accepted / self.draft_tokens:.2f}" if self.draft_tokens else "-"

    @property
    def mean_accepted_length(self) -> str:
        return f"{1 + self.accepted / self.drafts:.2f}" if self.drafts else "-"


def measure(
    llms: dict[str, LLM], convs: list[list[dict]], params: SamplingParams, batch: int, repeats: int
) -> dict[str, Result]:
    """Each configuration `repeats` times, interleaved, so that a burst of load on the shared machine
    slows every configuration alike; the fastest run of each counts (counters over all runs)."""
    results: dict[str, Result] = {}
    for _ in range(repeats):
        for name, llm in llms.items():
            before = spec_counters(llm)
            seconds, tokens = run(llm, convs, params, batch)
            rate = sum(len(t) for t in tokens) / seconds
            result = results.setdefault(name, Result(rate, tokens))
            result.rate = max(result.rate, rate)
            delta = [b - a for a, b in zip(before, spec_counters(llm), strict=True)]
            result.drafts += delta[0]
            result.draft_tokens += delta[1]
            result.accepted += delta[2]
    return results


if __name__ == "__main__":
    main()
