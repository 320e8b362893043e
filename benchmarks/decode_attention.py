"""Decode attention alone: the CPU backend's paged kernel vs the torch backend, against the bytes it reads.

    python benchmarks/decode_attention.py --num-seqs 256 --min-context 64 --max-context 640

SmolLM2's shapes by default (9 query heads, 3 KV heads, head size 64, blocks of 16, bfloat16). Each
sequence's blocks are scattered over the pool, and there is one pool per layer (--layers of them, more
than the caches hold), cycled as a forward pass does, so K/V come from DRAM as in a real step. Reports ms
per layer, the GB/s of K/V read, and the time of a plain streaming read (`sum`) of the same pools: the
memory-bandwidth floor for this step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.cpu_backend import CpuAttentionBackend, cpu_kernels_available
from duoserve.attention.torch_backend import TorchAttentionBackend


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
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert cpu_kernels_available(), "the CPU kernel did not build"
    dtype, bs = getattr(torch, args.dtype), args.block_size
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_context, args.max_context + 1, (args.num_seqs,), generator=gen)
    blocks_per_seq = (lens + bs - 1) // bs
    num_blocks = int(blocks_per_seq.sum()) + 1
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    pools = [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(args.layers)
    ]
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

    def layers_of(backend):
        backend.prepare(meta)
        return lambda: [backend.forward(q, k, v, pool, meta, scale) for pool in pools]

    variants = {
        "cpu (paged kernel)": layers_of(CpuAttentionBackend()),
        "torch (gather + SDPA)": layers_of(TorchAttentionBackend()),
        "streaming read of the pools": lambda: [(kp.sum(), vp.sum()) for kp, vp in pools],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits all alike
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.layers)
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * pools[0][0].element_size()
    pool_bytes = 2 * pools[0][0].numel() * pools[0][0].element_size()
    print(
        f"{args.num_seqs} sequences of {args.min_context}-{args.max_context} tokens, {args.dtype}, "
        f"{kv_bytes / 1e6:.1f} MB of K/V per layer, {args.layers} layers, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| variant | ms per layer | GB/s |")
    print("|---|---|---|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        read = pool_bytes if name.startswith("streaming") else kv_bytes
        print(f"| {name} | {seconds * 1e3:.2f} | {read / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
