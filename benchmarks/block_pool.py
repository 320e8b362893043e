"""BlockPool free-queue cost: taking the LRU block must not get slower as more blocks went before it.

    python benchmarks/block_pool.py [--num-blocks 60000] [--probe 2000] [--repeats 3] [--check]

A plain dict's first key is found by scanning past every key deleted before it, which once made
allocation quadratic in the pool's history; the free queue is an OrderedDict so that taking, touching
and returning a block are O(1). This times single-block allocations at three points of a pool's life:
fresh ("early"), after most of the pool was taken ("late"), and after a large free-then-take cycle moved
the queue front through many freed blocks ("later"). Each should cost about the same per block.
`--check` exits 1 when the slowest point costs 3x the early one or more (the best of the repeats), as
the old unit test asserted; run it on a quiet machine (it measures wall-clock time).
"""

from __future__ import annotations

import argparse
import sys
import time

from duoserve.kv.block_pool import BlockPool


def _allocate_one_by_one(pool: BlockPool, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        pool.allocate(1)
    return time.perf_counter() - start


def measure(num_blocks: int, probe: int) -> tuple[float, float, float]:
    """Seconds per single-block allocation: early, late, later."""
    pool = BlockPool(num_blocks)
    taken_late = num_blocks * 5 // 6  # 50_000 of 60_000
    early = _allocate_one_by_one(pool, probe)
    pool.allocate(taken_late - probe)
    late = _allocate_one_by_one(pool, probe)
    pool.free(list(range(num_blocks // 2)))
    pool.allocate(num_blocks // 3)  # the queue front moves through that many freed-then-taken blocks
    later = _allocate_one_by_one(pool, probe)
    return early / probe, late / probe, later / probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-blocks", type=int, default=60_000)
    parser.add_argument("--probe", type=int, default=2_000, help="single-block allocations timed per point")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a later point costs >= 3x early")
    args = parser.parse_args()
    if args.num_blocks < 6 * args.probe:
        parser.error("--num-blocks must be at least 6 x --probe")
    ratios = []
    print(f"{'repeat':>6} {'early ns':>10} {'late ns':>10} {'later ns':>10} {'worst/early':>12}")
    for repeat in range(args.repeats):
        early, late, later = measure(args.num_blocks, args.probe)
        ratio = max(late, later) / early
        ratios.append(ratio)
        print(f"{repeat:>6} {early * 1e9:>10.0f} {late * 1e9:>10.0f} {later * 1e9:>10.0f} {ratio:>12.2f}")
    best = min(ratios)
    print(f"best worst/early ratio: {best:.2f}")
    if args.check and best >= 3:
        sys.exit(f"allocation got {best:.1f}x slower as the pool's history grew: not O(1)")


if __name__ == "__main__":
    main()
