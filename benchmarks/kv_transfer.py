"""KV transfer bandwidth: a prefill-side KVSender pushing SmolLM2-sized blocks to a KVReceiver over TCP.

    python benchmarks/kv_transfer.py [--prompt-tokens 768] [--chunk-tokens 512] [--repeats 5] [--dtype DTYPE]
        [--cluster-secret SECRET]

Measures what the disaggregated deployment's transfer path does per request: export the blocks from a
KV cache, send them in chunks (zero-copy frames), receive, check and import them into another cache.
Reports bytes per request, time, and bandwidth, against a plain in-memory copy of the same bytes.
With `--cluster-secret`, every message is authenticated as in a deployment that has one (HMAC-SHA256
over the blocks on both ends): run it with and without to see what authentication costs.
"""

from __future__ import annotations

import argparse
import time

import torch
import zmq

from duoserve.disagg.kv_transfer import (
    KVBlocks,
    KVDone,
    KVLayout,
    KVReceiver,
    KVSender,
    KVTicket,
    decode_blocks,
)
from duoserve.kv.cache import KVCache, KVCacheSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", help="KV cache dtype")
    parser.add_argument("--cluster-secret", default=None, help="authenticate every message (HMAC-SHA256)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, 16-token blocks.
    dtype = getattr(torch, args.dtype)
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype)
    num_blocks = -(-args.prompt_tokens // spec.block_size)
    source, target = (
        KVCache(spec, num_blocks, torch.device("cpu")),
        KVCache(spec, num_blocks, torch.device("cpu")),
    )
    source.data.normal_()
    layout = KVLayout.of(spec)
    context = zmq.Context()
    sender = KVSender(context, args.cluster_secret)
    receiver = KVReceiver(context, "127.0.0.1", layout, num_blocks, args.cluster_secret)
    ticket = KVTicket("r", receiver.address, list(range(num_blocks)), 0, layout)
    per_chunk = args.chunk_tokens // spec.block_size
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        for first in range(0, num_blocks, per_chunk):
            ids = list(range(first, min(num_blocks, first + per_chunk)))
            sender.send_blocks(ticket, ids, source.export_blocks(ids))
        sender.send_done(ticket, 0, num_blocks)
        done = False
        while not done:
            for message, payload in receiver.receive(lambda request_id: request_id == ticket.request_id):
                if isinstance(message, KVBlocks):
                    target.import_blocks(message.block_ids, decode_blocks(message, payload, layout))
                elif isinstance(message, KVDone):
                    done = True
        times.append(time.perf_counter() - start)
    assert torch.equal(source.data, target.data)
    copy_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        target.data.copy_(source.data)
        copy_times.append(time.perf_counter() - start)
    nbytes = layout.nbytes(num_blocks)
    best, median = min(times[1:]), sorted(times[1:])[len(times[1:]) // 2]
    assert not any(receiver.drops.counts.values()), receiver.drops.counts
    auth = "HMAC-SHA256 authenticated" if args.cluster_secret else "not authenticated"
    print(
        f"KV per request: {args.prompt_tokens} tokens = {num_blocks} blocks = "
        f"{nbytes / 1e6:.1f} MB ({args.dtype}, {auth})"
    )
    print(
        f"transfer (export + send + receive + import), median of {args.repeats}: {median * 1e3:.1f} ms "
        f"= {nbytes / median / 1e9:.2f} GB/s (best {nbytes / best / 1e9:.2f} GB/s)"
    )
    copy = sorted(copy_times)[len(copy_times) // 2]
    print(f"plain memory copy of the same bytes: {copy * 1e3:.1f} ms = {nbytes / copy / 1e9:.2f} GB/s")
    sender.close()
    receiver.close()
    context.term()


if __name__ == "__main__":
    main()
