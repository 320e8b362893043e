"""Decode attention alone: the CPU backend's paged kernel vs the torch backend, against the bytes it reads.

    python benchmarks/decode_attention.py --num-seqs 256 --min-context 64 --max-context 640
    # 1-byte KV caches against bfloat16 at long context (issue 15: fp8 and int8 >= 1.5x faster):
    python benchmarks/decode_attention.py --num-seqs 256 --min-context 2048 --max-context 2048 --layers 4 \\
        --no-torch --kv-dtype bfloat16 fp8_e4m3 fp8_e5m2 int8
    # short context, the least noisy ratio: one thread, the 10th percentile of many calls
    python benchmarks/decode_attention.py --num-seqs 8 --min-context 64 --max-context 128 --threads 1 \\
        --repeats 300 --no-torch --kv-dtype bfloat16 fp8_e4m3 fp8_e5m2 int8

SmolLM2's shapes by default (9 query heads, 3 KV heads, head size 64, blocks of 16, bfloat16). Each
sequence's blocks are scattered over the pool, and there is one pool per layer (--layers of them, more
than the caches hold), cycled as a forward pass does, so K/V come from DRAM as in a real step.

Each --kv-dtype gets its own pools (1-byte ones quantized from the same random values, with a float16
scale per (token, KV head) row: duoserve/kv/quant.py) and is timed through the kernel alone
(`cpu_backend.paged_decode`); the model's dtype (--dtype) through the CPU backend's whole decode (which
also stores the step's K/V) and, unless --no-torch, the torch backend (gather + SDPA). Reports ms per
layer (median and 10th percentile of --repeats), the bytes of K/V each reads (row scales included), their
GB/s, and the bound for those bytes: bytes / the read bandwidth of a plain
streaming read (`sum`) over a float32 buffer as large as one dtype's pools, measured alongside.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.cpu_backend import CpuAttentionBackend, cpu_kernels_available, paged_decode
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.kv.quant import SCALE_BYTES, is_quantized
from duoserve.kv.quant import quantize as quantize_rows

KV_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


def quantize(pool: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 pool as `dtype`, with its row scales if that is a 1-byte dtype."""
    return quantize_rows(pool, dtype) if is_quantized(dtype) else (pool.to(dtype), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-context", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=640)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", help="the model's (queries') dtype")
    parser.add_argument(
        "--kv-dtype", nargs="+", choices=list(KV_DTYPES), help="KV cache dtypes to compare (default: --dtype)"
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own)")
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the torch backend (slow at long context)"
    )
    args = parser.parse_args()
    assert cpu_kernels_available(), "the CPU kernel did not build"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, bs = getattr(torch, args.dtype), args.block_size
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_context, args.max_context + 1, (args.num_seqs,), generator=gen)
    blocks_per_seq = (lens + bs - 1) // bs
    num_blocks = int(blocks_per_seq.sum()) + 1
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 pads the tables
    tables = torch.zeros(args.num_seqs, int(blocks_per_seq.max()), dtype=torch.long)
    offset = 0
    for i, n in enumerate(blocks_per_seq.tolist()):
        tables[i, :n] = order[offset : offset + n]
        offset += n
    last = lens - 1  # each sequence's new token: the last position of its context
    slots = tables.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    meta = AttentionMetadata(slots, args.num_seqs, tables, lens, [], bs)
    q = torch.randn(args.num_seqs, args.heads, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(args.num_seqs, args.kv_heads, args.head_dim, generator=gen).to(dtype)
    v = torch.randn_like(k)
    scale = args.head_dim**-0.5

    # Per layer: float32 values, then each dtype's pools and scales made from them.
    kv_names = args.kv_dtype or [args.dtype]
    pools: dict[str, list] = {name: [] for name in kv_names}
    for _ in range(args.layers):
        values = [torch.randn(shape, generator=gen) for _ in range(2)]
        for name in kv_names:
            (kp, ks), (vp, vs) = (quantize(x, KV_DTYPES[name]) for x in values)
            pools[name].append((kp, vp, ks, vs))
        del values

    def kernel_of(name: str) -> Callable[[], None]:
        def run() -> None:
            for kp, vp, ks, vs in pools[name]:
                paged_decode(q, kp, vp, tables, lens, scale, k_scale=ks, v_scale=vs)

        return run

    def backend_of(backend) -> Callable[[], None]:
        layers = [(kp, vp) for kp, vp, _, _ in pools[args.dtype]]
        backend.prepare(meta)
        return lambda: [backend.forward(q, k, v, pool, meta, scale) for pool in layers]

    element_bytes = {name: torch.empty(0, dtype=KV_DTYPES[name]).element_size() for name in kv_names}
    row_bytes = {  # a K or V row: its values, and a 1-byte cache's row scale
        name: args.head_dim * size + (SCALE_BYTES if is_quantized(KV_DTYPES[name]) else 0)
        for name, size in element_bytes.items()
    }
    kv_bytes = {name: int(lens.sum()) * args.kv_heads * 2 * size for name, size in row_bytes.items()}
    # Two buffers the size of the widest dtype's pools of a layer, read in turn (far past the caches).
    stream_numel = 2 * num_blocks * bs * args.kv_heads * args.head_dim * max(element_bytes.values()) // 4
    stream = [torch.randn(stream_numel) for _ in range(2)]
    stream_bytes = stream_numel * 4
    variants: dict[str, tuple[Callable[[], None], int]] = {
        f"paged kernel, KV {name}": (kernel_of(name), kv_bytes[name]) for name in kv_names
    }
    if args.dtype in pools:
        variants[f"cpu backend (store + kernel), KV {args.dtype}"] = (
            backend_of(CpuAttentionBackend()),
            kv_bytes[args.dtype],
        )
        if not args.no_torch:
            variants[f"torch backend (gather + SDPA), KV {args.dtype}"] = (
                backend_of(TorchAttentionBackend()),
                kv_bytes[args.dtype],
            )
    variants["streaming read (float32 sum)"] = (
        lambda: [stream[i % 2].sum() for i in range(args.layers)],
        stream_bytes,
    )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run, _ in variants.values():
        run()  # warm-up
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits all alike
        for name, (run, _) in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.layers)
    bandwidth = stream_bytes / statistics.median(times["streaming read (float32 sum)"])
    first = f"paged kernel, KV {kv_names[0]}"
    print(
        f"{args.num_seqs} sequences of {args.min_context}-{args.max_context} tokens, queries {args.dtype}, "
        f"{args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, blocks of {bs}, "
        f"{args.layers} layers, "
        f"torch threads {torch.get_num_threads()}; read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"| variant | ms per layer (median) | p10 | MB of K/V per layer | GB/s | bound (ms) "
        f"| x vs {kv_names[0]} (median, p10) |"
    )
    print("|---|---|---|---|---|---|---|")

    def p10(samples: list[float]) -> float:
        return statistics.quantiles(samples, n=10)[0] if len(samples) >= 2 else samples[0]

    for name, samples in times.items():
        seconds, read = statistics.median(samples), variants[name][1]
        speedup = ""
        if name.startswith("paged kernel"):
            speedup = (
                f"{statistics.median(times[first]) / seconds:.2f}, {p10(times[first]) / p10(samples):.2f}"
            )
        print(
            f"| {name} | {seconds * 1e3:.3f} | {p10(samples) * 1e3:.3f} | {read / 1e6:.1f} "
            f"| {read / seconds / 1e9:.1f} | {read / bandwidth * 1e3:.3f} | {speedup} |"
        )


if __name__ == "__main__":
    main()
