"""Structured outputs: grammar engines compared, the mask thread's overlap, and the decoding cost.

    python benchmarks/structured_outputs.py [--parts engines,overlap,throughput] [--tokens 64]
        [--masks auto|overlap|serial,...] [--quick]

On the default model's tokenizer (SmolLM2, 49,152 tokens) and a 6-property JSON schema:

- engines: llguidance and outlines-core side by side: the time to build the tokenizer tables once, to
  compile the schema, and per token of a valid output, the time to compute the next token's mask and
  advance (mean, p50, p99). This is the measurement duoserve.grammar's choice rests on.
- overlap: whether llguidance computes masks while torch runs a matmul on the same process (it drops the
  GIL): the wall time of both together against each alone.
- throughput: LLM.generate on SmolLM2, batch 1 and 32, unconstrained against the schema (greedy,
  --tokens tokens each): output tokens per second and process CPU per step (issue 16's goal: under 5%
  cost at batch 32); `--masks overlap,serial` measures both places the masks can be computed (beside
  the forward, or on the engine thread after it) against one unconstrained run.

Wall-clock measurements: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "active", "address"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@analytical.com",
    "tags": ["math", "engines"],
    "active": True,
    "address": {"city": "London", "zip": "W1"},
}


def _stats(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"mean {statistics.mean(seconds) * 1e6:8.1f} us  p50 {statistics.median(seconds) * 1e6:8.1f} us  "
        f"p99 {p99 * 1e6:8.1f} us"
    )


def _tokenizer():
    from duoserve.models.loader import default_model_path
    from duoserve.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def bench_llguidance(tokenizer, tokens: list[int]) -> None:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)
    setup = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)  # it compiles lazily: the first mask counts
    compile_seconds = time.perf_counter() - start
    per_token = []
    for token in tokens:
        start = time.perf_counter()
        assert matcher.consume_token(token), matcher.get_error()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        per_token.append(time.perf_counter() - start)
    print(f"llguidance    tables {setup * 1e3:8.1f} ms  compile+first mask {compile_seconds * 1e3:8.1f} ms")
    print(f"llguidance    per token (advance + mask): {_stats(per_token)}")


def bench_outlines(tokenizer, tokens: list[int]) -> None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        print("outlines-core is not installed (pip install outlines-core): skipped")
        return
    from duoserve.tokenizer import _BYTE_TO_CHAR

    char_to_byte = {c: b for b, c in _BYTE_TO_CHAR.items()}
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for token_id in range(tokenizer.vocab_size):
        if token_id == eos:
            continue
        (text,) = tokenizer.convert_ids_to_tokens([token_id])
        if text is None or not set(text) <= char_to_byte.keys():
            continue  # special tokens: never part of a JSON output
        vocab.setdefault(bytes(char_to_byte[c] for c in text), []).append(token_id)
    vocabulary = Vocabulary(eos, vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index = Index(regex, vocabulary)
    guide = Guide(index)
    mask = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
    compile_seconds = time.perf_counter() - start
    per_token = []
    for token in tokens:
        start = time.perf_counter()
        guide.advance(token)
        if not guide.is_finished():
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        per_token.append(time.perf_counter() - start)
    print(f"outlines-core tables {setup * 1e3:8.1f} ms  compile+first mask {compile_seconds * 1e3:8.1f} ms")
    print(f"outlines-core per token (advance + mask): {_stats(per_token)}")


def bench_engines() -> None:
    tokenizer = _tokenizer()
    tokens = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    print(f"schema: {len(SCHEMA['properties'])} properties; a valid output of {len(tokens)} tokens")
    bench_llguidance(tokenizer, tokens)
    bench_outlines(tokenizer, tokens)


def bench_overlap(seconds: float = 1.0) -> None:
    """Masks on a thread against a torch matmul loop: together they take about the longer one alone
    only if the mask computation does not hold the GIL."""
    import llguidance
    import llguidance.torch

    tokenizer = _tokenizer()
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(ll_tokenizer, grammar) for _ in range(8)]
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), ll_tokenizer.vocab_size)
    a = torch.randn(1024, 1024)

    def masks(count: int) -> None:
        for _ in range(count):
            for i, matcher in enumerate(matchers):
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, i)

    def matmuls(count: int) -> None:
        for _ in range(count):
            a @ a

    def timed(fn, *args) -> float:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    # Calibrate each to about `seconds` alone.
    mask_count = max(1, int(seconds / max(timed(masks, 20) / 20, 1e-6)))
    matmul_count = max(1, int(seconds / max(timed(matmuls, 5) / 5, 1e-6)))
    alone_masks, alone_matmuls = timed(masks, mask_count), timed(matmuls, matmul_count)
    thread = threading.Thread(target=masks, args=(mask_count,))
    start = time.perf_counter()
    thread.start()
    matmuls(matmul_count)
    thread.join()
    together = time.perf_counter() - start
    print(
        f"overlap: masks alone {alone_masks:.2f} s, matmuls alone {alone_matmuls:.2f} s, together "
        f"{together:.2f} s (serialised would be {alone_masks + alone_matmuls:.2f} s; "
        f"torch threads {torch.get_num_threads()})"
    )


def bench_throughput(num_tokens: int, batches: list[int], modes: list[str]) -> None:
    """Also the CPU time per step (the whole process's, and the masks' own: their fill and the engine
    thread's apply), which a busy machine distorts far less than the wall time. `modes`: where the masks
    are computed, each measured against the same unconstrained run: auto (this host's choice), overlap
    (beside the forward) or serial (on the engine thread after it)."""
    from duoserve import LLM, SamplingParams
    from duoserve.engine.structured import overlap_masks
    from duoserve.hardware import detect_cpu

    llm = LLM()
    structured = llm.engine.core.structured
    stats = structured.stats
    cores, threads = detect_cpu().cores, torch.get_num_threads()
    choice = "overlap" if overlap_masks(cores, threads) else "serial"
    print(f"{cores} usable cores, {threads} torch threads: masks {choice} here (auto)")
    prompt = "Describe people as JSON."
    # Long enough that no output completes within num_tokens: every request decodes all of them, as the
    # unconstrained ones do with ignore_eos.
    people = {"type": "array", "items": SCHEMA, "minItems": 100}
    forced = {"auto": None, "overlap": True, "serial": False}
    for batch in batches:
        for mode in ["free", *modes]:
            constrained = mode != "free"
            structured.overlap = forced.get(mode)
            params = SamplingParams(
                temperature=0,
                max_tokens=num_tokens,
                ignore_eos=True,
                structured_outputs={"json": people} if constrained else None,
            )
            llm.generate([prompt] * batch, params, use_tqdm=False)  # warm up (and compile the grammar)
            before = dataclasses.replace(stats)
            start, cpu = time.perf_counter(), time.process_time()
            outputs = llm.generate([prompt] * batch, params, use_tqdm=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            label = f"schema ({mode})" if constrained else "free"
            print(
                f"batch {batch:3d} {label:16s}: {tokens / seconds:8.1f} output tok/s ({tokens} tokens), "
                f"process CPU {cpu / num_tokens * 1e3:7.1f} ms per step"
            )
            steps = stats.steps - before.steps
            if steps:
                per_step = {
                    name: (getattr(stats, name) - getattr(before, name)) / steps * 1e3
                    for name in ("fill_cpu_s", "fill_wall_s", "apply_cpu_s", "wait_s")
                }
                serial = stats.serial_steps - before.serial_steps
                where = "on the engine thread after the forward" if serial else "on the mask thread"
                print(
                    f"  masks per step ({steps} steps, filled {where}): fill {per_step['fill_cpu_s']:.2f} ms "
                    f"CPU ({per_step['fill_wall_s']:.2f} ms wall), apply {per_step['apply_cpu_s']:.2f} ms "
                    f"CPU, engine waited {per_step['wait_s']:.2f} ms for them"
                )
    structured.overlap = None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="engines,overlap,throughput")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request (throughput)")
    parser.add_argument("--batches", default="1,32", help="throughput: batch sizes, comma-separated")
    parser.add_argument(
        "--masks",
        default="auto",
        help="throughput: where masks are computed, comma-separated: auto, overlap, serial (A/B in one run)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers mean nothing)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "engines" in parts:
        bench_engines()
    if "overlap" in parts:
        bench_overlap(0.2 if args.quick else 1.0)
    if "throughput" in parts:
        modes = args.masks.split(",")
        if unknown := set(modes) - {"auto", "overlap", "serial"}:
            parser.error(f"--masks: unknown {sorted(unknown)}")
        batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
        bench_throughput(8 if args.quick else args.tokens, batches, modes)


if __name__ == "__main__":
    main()
