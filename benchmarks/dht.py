"""DHT lookups on the in-memory transport: latency, messages and hops for growing swarms.

Each swarm is built the way real ones grow: nodes join one after another (a few at a time),
each through 3 random nodes that joined before it, so no node starts with a complete table.
Then, from random nodes, it times two kinds of lookup, with no simulated latency and with a
one-way delay on every message (``MemoryNetwork.set_latency``):

- ``find_node``: a random target, run until the k closest nodes have answered;
- ``get``: a stored key (FIND_VALUE), done once ``get_quorum`` holders answered.

``RPCs`` counts calls per lookup (each is a request and a reply); ``hops`` is the longest chain
of referrals behind an answering node (the initial contacts are hop 1), shown beside log2(N)
and log2(N/k). Kademlia bounds hops by O(log N); since every reply carries up to k contacts,
each hop gains several bits, and hops grow by a fraction of a hop per doubling of N.
Prints a table; asserts nothing.

    python benchmarks/dht.py            # 16..512 nodes, 200 lookups per cell
    python benchmarks/dht.py --quick    # 16..128 nodes, 30 lookups per cell (under a minute)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from distllm.config import DHTConfig
from distllm.dht.node import DHTNode
from distllm.dht.records import sign_entry
from distllm.dht.swarm import MemorySwarm, memory_swarm, swarm_identity

# Lookups only: no background cache stores competing for the CPU while we time them.
CONFIG = DHTConfig(call_timeout=5.0, maintenance_interval=3600.0, cache_on_get=False)
STORED_KEYS = 64


@dataclass
class Cell:
    """Measurements of one (swarm size, lookup kind)."""

    seconds: dict[float, list[float]] = field(default_factory=dict)  # latency -> durations
    rpcs: list[int] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    found: int = 0
    asked: int = 0


async def measure(
    swarm: MemorySwarm,
    cell: Cell,
    latency: float,
    lookups: int,
    rng: random.Random,
    run: Callable[[DHTNode, random.Random], Awaitable[bool]],
) -> None:
    swarm.network.set_latency(latency)
    durations = cell.seconds.setdefault(latency, [])
    for _ in range(lookups):  # one at a time, so each lookup's counters are its own
        node = rng.choice(swarm.nodes)
        before = (node.stats.queries, node.stats.hops)
        started = time.perf_counter()
        ok = await run(node, rng)
        durations.append(time.perf_counter() - started)
        cell.rpcs.append(node.stats.queries - before[0])
        cell.hops.append(node.stats.hops - before[1])
        cell.found += ok
        cell.asked += 1


async def bench_size(size: int, lookups: int, latency: float, seed: int) -> dict[str, Cell]:
    rng = random.Random(seed)
    async with memory_swarm(0, config=CONFIG) as swarm:
        started = time.perf_counter()
        await swarm.join(await swarm.spawn(size), parallelism=4, rng=rng)
        joined = time.perf_counter() - started
        keys = [f"bench/{i}" for i in range(STORED_KEYS)]
        entries = [
            sign_entry(swarm_identity(rng.randrange(size)), key, b"x" * 200, time.time() + 3600)
            for key in keys
        ]
        await swarm.nodes[0].store_many(entries)
        mean_table = statistics.fmean(len(n.routing_table) for n in swarm.nodes)
        print(f"  {size} nodes joined in {joined:.1f} s; mean table size {mean_table:.0f}")

        async def find_node(node: DHTNode, rng: random.Random) -> bool:
            return bool(await node.find_nodes(rng.randbytes(32)))

        async def get(node: DHTNode, rng: random.Random) -> bool:
            return bool(await node.get(rng.choice(keys)))

        cells = {"find_node": Cell(), "get": Cell()}
        for delay in (0.0, latency):
            for name, run in (("find_node", find_node), ("get", get)):
                await measure(swarm, cells[name], delay, lookups, rng, run)
        return cells


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def print_table(results: dict[int, dict[str, Cell]], latency: float) -> None:
    ms = f"{latency * 1000:g} ms"
    header = (
        f"{'N':>5} {'log2 N':>6} {'log2 N/k':>8} {'lookup':>9} {'hops':>5} {'max':>4} {'RPCs':>6}"
        f" {'found':>6} {'0 ms: med':>10} {'p99':>7} {ms + ': med':>11} {'p99':>7}"
    )
    print(header)
    print("-" * len(header))
    for size, cells in results.items():
        for name, cell in cells.items():
            fast, slow = cell.seconds[0.0], cell.seconds[latency]
            print(
                f"{size:>5} {math.log2(size):>6.1f} {math.log2(size / CONFIG.k):>8.1f} {name:>9}"
                f" {statistics.fmean(cell.hops):>5.2f} {max(cell.hops):>4}"
                f" {statistics.fmean(cell.rpcs):>6.1f} {cell.found / cell.asked:>6.0%}"
                f" {statistics.median(fast) * 1e3:>8.1f}ms {percentile(fast, 0.99) * 1e3:>5.1f}ms"
                f" {statistics.median(slow) * 1e3:>9.1f}ms {percentile(slow, 0.99) * 1e3:>5.1f}ms"
            )


async def main(args: argparse.Namespace) -> None:
    sizes = args.sizes or ([16, 32, 64, 128] if args.quick else [16, 32, 64, 128, 256, 512])
    lookups = args.lookups or (30 if args.quick else 200)
    latency = args.latency_ms / 1000
    print(
        f"DHT lookups on the in-memory transport: k={CONFIG.k}, alpha={CONFIG.alpha},"
        f" get_quorum={CONFIG.get_quorum}; {lookups} lookups per cell and latency"
    )
    results = {}
    for size in sizes:
        results[size] = await bench_size(size, lookups, latency, args.seed + size)
    print()
    print_table(results, latency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16..128 nodes, fewer lookups")
    parser.add_argument("--sizes", type=int, nargs="+", help="swarm sizes (overrides --quick)")
    parser.add_argument("--lookups", type=int, help="lookups per cell (default 200; quick 30)")
    parser.add_argument(
        "--latency-ms", type=float, default=5.0, help="one-way delay per message (5)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
