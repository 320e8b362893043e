"""Offline throughput: duoserve `LLM.generate` vs transformers `generate` with static batches, same work.

    python benchmarks/throughput.py --num-requests 256 --min-input 64 --max-input 512 --output-len 128

Prompts are random token ids (lengths uniform in [min, max]); every request generates exactly
--output-len tokens (ignore_eos / min_new_tokens), greedy. duoserve runs --dtype (auto: its default);
transformers runs each of --hf-dtypes, in static batches of --hf-batch-size with left padding, the way
a user of `generate` batches. Prints output tokens/s of each and the ratio to the fastest transformers.
--hf-sample N times transformers on the first N batches only and extrapolates (its cost per batch is
steady), to keep the run short; 0 runs all of them.
--step-trace PATH writes duoserve's steps (`LLM(step_trace=...)`, duoserve/plan/trace.py) and prints where
the timed run's time went: the steps with prompt tokens, and the pure decode steps by batch size.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from duoserve import LLM, SamplingParams
from duoserve.llm import OFFLINE_MAX_NUM_BATCHED_TOKENS
from duoserve.models.loader import default_model_path


def make_prompts(num: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids above the special tokens SmolLM2 keeps at the start of its vocabulary.
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(low, high))] for _ in range(num)]


def run_duoserve(
    prompts: list[list[int]], output_len: int, attention_backend: str, args: argparse.Namespace
) -> float:
    llm = LLM(
        dtype=args.dtype,
        attention_backend=attention_backend,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_fraction=0.5,  # room for every request's KV: no preemption in the measurement
        step_trace=args.step_trace,
    )
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start, since = time.perf_counter(), time.time()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    if args.step_trace:
        llm.close()  # writes the trace's last step
        print_step_split(args.step_trace, since)
    return elapsed


def print_step_split(path: str, since: float) -> None:
    """The steps that started after `since` (Unix time) in a step trace: with prompt tokens, and pure
    decode by batch size."""
    from duoserve.plan.trace import read_trace

    trace = read_trace(path)
    steps = [s for s in trace.steps if trace.header["origin_unix"] + s.start >= since]
    prefill = [s for s in steps if s.shape.prefill_tokens]
    decode: dict[int, list[float]] = {}
    for s in steps:
        if not s.shape.prefill_tokens:
            decode.setdefault(s.shape.decode_seqs, []).append(s.seconds)
    tokens = sum(s.shape.prefill_tokens for s in prefill)
    print(
        f"steps with prompt tokens: {len(prefill)}, {sum(s.seconds for s in prefill):.2f} s "
        f"({tokens} prompt tokens); pure decode: {sum(map(len, decode.values()))}, "
        f"{sum(map(sum, decode.values())):.2f} s"
    )
    medians = ", ".join(f"{rows}: {1e3 * sorted(t)[len(t) // 2]:.1f}" for rows, t in sorted(decode.items()))
    print(f"pure decode steps, median ms by batch size: {medians}")


def run_transformers(
    prompts: list[list[int]], output_len: int, batch_size: int, sample: int, dtype: str
) -> float:
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype)
    ).eval()
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    timed = batches[:sample] if sample else batches
    elapsed = 0.0
    for batch in timed:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=pad,
            )
        elapsed += time.perf_counter() - start
        assert out.shape[1] == width + output_len
    return elapsed * len(batches) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-input", type=int, default=64)
    parser.add_argument("--max-input", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--hf-sample", type=int, default=0, help="time only this many HF batches (0: all)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=OFFLINE_MAX_NUM_BATCHED_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--attention-backends", nargs="+", default=["auto"], help="duoserve runs, one per backend"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--step-trace", help="write duoserve's steps here and print where the time went")
    args = parser.parse_args()
    prompts = make_prompts(args.num_requests, args.min_input, args.max_input, 49152, args.seed)
    total_out = args.num_requests * args.output_len
    print(f"{args.num_requests} requests, {sum(map(len, prompts))} prompt tokens, {total_out} output tokens")
    ours = None
    for backend in args.attention_backends:
        elapsed = run_duoserve(prompts, args.output_len, backend, args)
        rate = total_out / elapsed
        print(f"duoserve LLM.generate ({backend} attention): {elapsed:.1f} s, {rate:.1f} output tok/s")
        ours = elapsed if ours is None else min(ours, elapsed)
    if args.skip_hf:
        return
    best = None
    for dtype in args.hf_dtypes:
        theirs = run_transformers(prompts, args.output_len, args.hf_batch_size, args.hf_sample, dtype)
        print(
            f"transformers generate {dtype} (static batches of {args.hf_batch_size}): {theirs:.1f} s, "
            f"{total_out / theirs:.1f} output tok/s; ratio {theirs / ours:.2f}x"
        )
        best = theirs if best is None else min(best, theirs)
    print(f"ratio to the fastest transformers: {best / ours:.2f}x")


if __name__ == "__main__":
    main()
