"""Decode-only step time at several batch sizes, split into model forward vs scheduling/Python overhead.

    python benchmarks/decode_step.py --batch-sizes 1 16 64 --context 256 --steps 20
    python benchmarks/decode_step.py --batch-sizes 32 --context 2048 --kv-cache-dtype int8  # long context
    python benchmarks/decode_step.py --batch-sizes 1 4 16 --context 320 --steps 60 --cpu-decode-layers ab

Each batch is prefilled once (prompts of --context tokens), then timed over --steps pure decode steps.
Also prints the memory-bandwidth bound of batch-1 decode: weight bytes read per step / copy bandwidth.
`--cpu-decode-layers ab` times each batch with a bfloat16 CPU model's one-call decode loop
(models/cpu_decode.py) and without it, alternated --rounds times in the same process (the same engine and
weights: this VM's speed drifts between runs, not within a round).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.sampling_params import SamplingParams


def copy_bandwidth(num_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted: 2 * size per copy)."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * num_bytes * repeats / (time.perf_counter() - start)


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes of weights a batch-1 decode step reads: every matrix once (its 4/8-bit codes where the model
    keeps them), of the embedding table only one row per token."""
    model = engine.core.model
    linears = [model.lm_head]
    tensors = [model.norm.weight]
    for layer in model.layers:
        linears += layer.linears()
        tensors += layer.norms()
    return sum(t.numel() * t.element_size() for t in tensors) + sum(linear.nbytes for linear in linears)


def run_batch(engine: LLMEngine, batch: int, context: int, steps: int) -> dict[str, float]:
    # Room to decode while the rest of the batch is still prefilling; aborted when timed.
    params = SamplingParams(temperature=0, max_tokens=steps + 256, ignore_eos=True)
    for i in range(batch):
        # Distinct prompts: no prefix sharing between rows.
        prompt = [(i * 7919 + j * 31) % 40000 + 100 for j in range(context)]
        engine.add_request(f"b{batch}-{i}", prompt, params)
    while any(
        r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids
        for r in engine.core.scheduler.requests.values()
    ):
        engine.step()
    forward, total = [], []
    for _ in range(steps):
        engine.step()
        stats = engine.core.last_step
        assert stats.num_scheduled_tokens == batch, f"not a pure decode step: {stats}"
        forward.append(stats.forward_seconds)
        total.append(stats.total_seconds)
    for i in range(batch):
        engine.abort(f"b{batch}-{i}")
    f, t = statistics.median(forward), statistics.median(total)
    return {
        "batch": batch,
        "step_ms": t * 1e3,
        "forward_ms": f * 1e3,
        "overhead_pct": 100 * (t - f) / t,
        "tok_s": batch / t,
    }


def compare_loop(engine: LLMEngine, args: argparse.Namespace) -> None:
    """Step ms per batch with the one-call CPU decode loop and with the Python layers, alternated."""
    model = engine.core.model
    model.cpu_decode_layers = True
    if model._cpu_decode_loop() is None:
        print("this model takes the Python layers on every step: nothing to compare")
        return
    times: dict[tuple[bool, int], list[float]] = {}
    for round_ in range(args.rounds):
        for on in (True, False) if round_ % 2 == 0 else (False, True):
            model.cpu_decode_layers = on
            for batch in args.batch_sizes:
                step = run_batch(engine, batch, args.context, args.steps)["step_ms"]
                times.setdefault((on, batch), []).append(step)
    print("| batch | one call: step ms (rounds) | Python layers: step ms (rounds) | ratio of medians |")
    print("|---|---|---|---|")
    for batch in args.batch_sizes:
        loop, layers = times[True, batch], times[False, batch]
        cells = [" / ".join(f"{t:.2f}" for t in ts) for ts in (loop, layers)]
        ratio = statistics.median(loop) / statistics.median(layers)
        print(f"| {batch} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--quantized-activations", default="auto", help="int16, int8 or auto")
    parser.add_argument("--kv-cache-dtype", default="auto", help="e.g. int8, fp8_e4m3 (issue 15)")
    parser.add_argument(
        "--cpu-decode-layers", choices=["on", "off", "ab"], default="on", help="ab: both, alternated"
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --cpu-decode-layers ab")
    args = parser.parse_args()
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            quantization=args.quantization,
            num_threads=args.threads,
            attention_backend=args.attention_backend,
            quantized_activations=args.quantized_activations,
            kv_cache_dtype=args.kv_cache_dtype,
            max_num_seqs=max(args.batch_sizes),
            max_num_batched_tokens=2048,
        )
    )
    backend = type(engine.core.model.attention).__name__
    print(
        f"torch threads: {torch.get_num_threads()}, dtype {engine.core.model.dtype}, {args.quantization=}, "
        f"attention {backend}, KV {engine.core.kv_cache.spec.dtype}"
    )
    bw = copy_bandwidth()
    wb = weight_bytes(engine)
    kv_per_token = engine.core.kv_cache.spec.bytes_per_block // engine.core.config.block_size
    model = engine.core.model
    if args.cpu_decode_layers == "ab":
        compare_loop(engine, args)
    else:
        model.cpu_decode_layers = args.cpu_decode_layers == "on"
        print("| batch | step ms | forward ms | overhead % | tok/s | bound ms (weights + KV read) |")
        print("|---|---|---|---|---|---|")
        for batch in args.batch_sizes:
            r = run_batch(engine, batch, args.context, args.steps)
            bound = (wb + batch * (args.context + 1) * kv_per_token) / bw
            print(
                f"| {r['batch']} | {r['step_ms']:.1f} | {r['forward_ms']:.1f} | {r['overhead_pct']:.1f} | "
                f"{r['tok_s']:.1f} | {bound * 1e3:.1f} |"
            )
    print(
        f"weights read per decode step: {wb / 1e6:.0f} MB; KV {kv_per_token} B per token of context; copy "
        f"bandwidth {bw / 1e9:.1f} GB/s; bandwidth bound for batch-1 step: {wb / bw * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
