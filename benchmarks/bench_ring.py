"""Placement benchmark: the consistent-hash ring against naive modulo placement, same run.

For each node count it prints, for both placements: the busiest node's load over the mean, the
fraction of keys whose primary moves when one node joins (ideal: 1/(n+1)), and lookups per
second for the replica set of one key (``owners``) and of a batch (``owners_many``).

    python benchmarks/bench_ring.py [--keys 200000] [--replicas 3] [--nodes 3 5 10 30]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from chunkstore.ring import HashRing, key_position


class Modulo:
    """Baseline: primary = key position mod n, replicas on the following node indexes."""

    def __init__(self, count: int) -> None:
        self.ids = [f"node-{i}" for i in range(count)]

    def owners(self, key: bytes, n: int) -> list[str]:
        first, count = key_position(key), len(self.ids)
        return [self.ids[(first + j) % count] for j in range(min(n, count))]

    def owners_many(self, keys: Sequence[bytes], n: int) -> list[list[str]]:
        return [self.owners(key, n) for key in keys]


def ring(count: int) -> HashRing:
    return HashRing([(f"node-{i}", 1.0) for i in range(count)])


def per_second(fn: Callable[[], object], items: int) -> float:
    start = time.perf_counter()
    fn()
    return items / (time.perf_counter() - start)


def measure(make: Callable[[int], Modulo | HashRing], count: int, keys: list[bytes], r: int):
    """(max/mean load, moved fraction on join, owners()/s, owners_many() keys/s)."""
    before, after = make(count), make(count + 1)
    before.owners(keys[0], r)  # build cached tables outside the timings
    old = [o[0] for o in before.owners_many(keys, 1)]
    new = [o[0] for o in after.owners_many(keys, 1)]
    peak = max(Counter(old).values()) / (len(keys) / count)
    moved = sum(a != b for a, b in zip(old, new, strict=True)) / len(keys)
    one = per_second(lambda: [before.owners(k, r) for k in keys], len(keys))
    many = per_second(lambda: before.owners_many(keys, r), len(keys))
    return peak, moved, one, many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000, help="random chunk ids to place")
    parser.add_argument("--replicas", type=int, default=3, help="owners looked up per key")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 5, 10, 30])
    args = parser.parse_args()

    data = np.random.default_rng(1).bytes(32 * args.keys)
    keys = [data[i : i + 32] for i in range(0, len(data), 32)]
    print(f"{args.keys} random 32-byte chunk ids, R={args.replicas}, 128 vnodes per weight\n")
    header = (
        f"{'nodes':>5}  {'placement':<9}  {'max/mean':>8}  {'moved on join':>13}  "
        f"{'ideal':>6}  {'owners()/s':>11}  {'owners_many/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for count in args.nodes:
        for name, make in (("ring", ring), ("modulo", Modulo)):
            peak, moved, one, many = measure(make, count, keys, args.replicas)
            print(
                f"{count:>5}  {name:<9}  {peak:>8.3f}  {moved:>13.3f}  {1 / (count + 1):>6.3f}  "
                f"{one:>11,.0f}  {many:>13,.0f}"
            )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
