"""Swarms on the in-memory transport: records survive a fifth of the nodes dying at once."""

from __future__ import annotations

import random
import time

import anyio
import pytest

from distllm.config import DHTConfig
from distllm.dht.records import SignedEntry, sign_entry
from distllm.dht.swarm import memory_swarm, swarm_identity

pytestmark = pytest.mark.anyio

# Kills are detected at once (a dead process resets its connections), so the generous call
# timeout only matters when the two shared CPUs are slow.
CONFIG = DHTConfig(call_timeout=3.0, maintenance_interval=3600.0)


async def stores_survive_churn(size: int, keys: int, *, within: float) -> None:
    rng = random.Random(size)
    with anyio.fail_after(within):
        async with memory_swarm(size, config=CONFIG) as swarm:
            assert all(len(node.routing_table) >= min(size - 1, 10) for node in swarm.nodes)
            by_owner: dict[int, list[SignedEntry]] = {}
            for i in range(keys):
                owner = rng.randrange(size)
                value = b"record %d" % i
                item = sign_entry(swarm_identity(owner), f"model/{i}", value, time.time() + 600)
                by_owner.setdefault(owner, []).append(item)
            counts: list[int] = []

            async def publish(owner: int, items: list[SignedEntry]) -> None:
                counts.extend(await swarm.nodes[owner].store_many(items))

            async with anyio.create_task_group() as tg:
                for owner, items in by_owner.items():
                    tg.start_soon(publish, owner, items)
            assert counts == [CONFIG.replication] * keys

            dead = set(rng.sample(range(size), size // 5))
            for index in dead:
                swarm.kill(swarm.nodes[index])
            alive = [n for i, n in enumerate(swarm.nodes) if i not in dead]
            wanted = [item for items in by_owner.values() for item in items]
            readers = rng.sample(alive, 3)
            found = 0
            for share, reader in enumerate(readers):  # each reader looks up a third of the keys
                mine = wanted[share :: len(readers)]
                got = await reader.get_many([item.key for item in mine])
                found += sum(got[item.key].get(item.subkey) == item for item in mine)
            assert found >= 0.99 * keys, f"{found}/{keys} records found"


async def test_30_nodes_lose_a_fifth_and_keep_their_records() -> None:
    await stores_survive_churn(30, 60, within=60)


@pytest.mark.slow
async def test_100_nodes_lose_a_fifth_and_keep_their_records() -> None:
    await stores_survive_churn(100, 200, within=110)
