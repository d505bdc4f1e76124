"""DHTNode on the in-memory transport, a few nodes: the RPCs, store/get semantics, client mode,
signatures and expiry."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from distllm.config import DHTConfig
from distllm.dht.messages import (
    METHOD_PING,
    METHOD_STORE,
    Contact,
    Ping,
    Pong,
    Store,
    StoreReply,
    StoreStatus,
    entries_to_wire,
)
from distllm.dht.node import DHTNode
from distllm.dht.records import SignedEntry, peer_subkey, sign_entry, signing_payload
from distllm.dht.routing import key_id
from distllm.identity import Identity
from distllm.ids import PeerAddress
from distllm.rpc import UnknownMethod
from distllm.testing import MemoryNetwork, identity_for, memory_rpc_endpoints

pytestmark = pytest.mark.anyio

FAST = DHTConfig(call_timeout=2.0, maintenance_interval=3600.0)


@asynccontextmanager
async def dht_nodes(
    n: int,
    *,
    config: DHTConfig = FAST,
    client: Sequence[int] = (),
    clocks: dict[int, Callable[[], float]] | None = None,
    network: MemoryNetwork | None = None,
) -> AsyncIterator[list[DHTNode]]:
    """``n`` nodes (identities ``identity_for(i)``), each joining through node 0."""
    async with (
        memory_rpc_endpoints(n, network=network) as rpcs,
        AsyncExitStack() as stack,
    ):
        nodes: list[DHTNode] = []
        for i, rpc in enumerate(rpcs):
            node = DHTNode(
                rpc,
                identity_for(i),
                initial_peers=[nodes[0].address] if nodes else [],
                config=config,
                client_mode=i in client,
                clock=(clocks or {}).get(i, time.time),
            )
            nodes.append(await stack.enter_async_context(node))
        yield nodes


def entry(owner: int, key: str, value: bytes = b"v", ttl: float = 60.0) -> SignedEntry:
    return sign_entry(identity_for(owner), key, value, time.time() + ttl)


def forged(victim: Identity, forger: Identity, key: str, value: bytes) -> SignedEntry:
    """An entry under ``victim``'s subkey, signed by ``forger``."""
    subkey = peer_subkey(victim.peer_id)
    expiration = time.time() + 60.0
    signature = forger.sign(signing_payload(key, subkey, value, expiration))
    return SignedEntry(key, subkey, value, expiration, forger.public_key_bytes, signature)


async def test_nodes_join_and_know_each_other() -> None:
    async with dht_nodes(3) as (a, b, c):
        for node in (a, b, c):
            others = {x.peer_id for x in (a, b, c)} - {node.peer_id}
            assert {e.peer_id for e in node.routing_table} == others
        found = await a.find_nodes(c.peer_id.digest)
        assert found[0] == c.address and set(found) == {b.address, c.address}


async def test_ping_adds_only_a_sender_whose_address_is_its_own() -> None:
    async with (
        memory_rpc_endpoints(3) as (server_rpc, honest, liar),
        DHTNode(server_rpc, identity_for(0), config=FAST) as server,
    ):
        reply = await honest.call(
            server.address, METHOD_PING, Ping(Contact.of(honest.address)), timeout=2
        )
        assert isinstance(reply, Pong)
        assert honest.peer_id in server.routing_table
        # The liar claims the honest peer's address... and a made-up one for a third id.
        await liar.call(server.address, METHOD_PING, Ping(Contact.of(honest.address)), timeout=2)
        await liar.call(
            server.address,
            METHOD_PING,
            Ping(Contact(identity_for(9).peer_id, "mem", liar.address.port)),
            timeout=2,
        )
        assert liar.peer_id not in server.routing_table
        assert identity_for(9).peer_id not in server.routing_table
        assert len(server.routing_table) == 1


async def test_store_then_get_from_every_node() -> None:
    async with dht_nodes(3) as nodes:
        item = entry(1, "model/0", b"hello")
        assert await nodes[1].store(item) == 3  # replication 5 > 3 nodes: all of them
        for node in nodes:
            assert await node.get("model/0") == {item.subkey: item}
            assert node.local_entries("model/0") == {item.subkey: item}
        assert await nodes[2].get("model/1") == {}


async def test_get_merges_subkeys_of_many_owners_and_get_many() -> None:
    async with dht_nodes(4) as nodes:
        items = [entry(owner, "block/7", b"from %d" % owner) for owner in range(4)]
        items.append(entry(2, "block/8"))
        counts = await nodes[0].store_many(items)  # anyone may relay a signed entry
        assert counts == [4] * 5
        found = await nodes[3].get_many(["block/7", "block/8", "block/9", "block/7"])
        assert set(found) == {"block/7", "block/8", "block/9"}
        assert found["block/7"] == {e.subkey: e for e in items[:4]}
        assert found["block/8"] == {items[4].subkey: items[4]}
        assert found["block/9"] == {}
        with pytest.raises(ValueError, match="parallelism"):
            await nodes[0].get_many(["x"], parallelism=0)


async def test_newer_expiration_wins() -> None:
    async with dht_nodes(3) as nodes:
        old = entry(0, "k", b"old", ttl=100)
        new = entry(0, "k", b"new", ttl=200)
        middle = entry(0, "k", b"middle", ttl=150)
        assert await nodes[0].store(old) == 3
        assert await nodes[1].store(new) == 3
        # Every holder keeps the newer one; the count says "holds this entry or a newer one".
        assert await nodes[2].store(middle) == 3
        for node in nodes:
            assert (await node.get("k"))[new.subkey].value == b"new"


async def test_expired_entries_are_not_stored_nor_returned() -> None:
    behind = time.time  # node 1's clock lags 100 s: it keeps what the others see as expired

    def lagging() -> float:
        return behind() - 100.0

    async with dht_nodes(3, clocks={1: lagging}) as (a, b, c):
        stale = entry(2, "k", ttl=-10.0)  # expired 10 s ago (in real time)
        assert await c.store(stale) == 1  # only the lagging node accepts it
        assert b.local_entries("k") == {stale.subkey: stale}
        assert await a.get("k") == {}  # the reader drops it: its own clock decides
        assert await b.get("k") == {stale.subkey: stale}

        short = entry(2, "short", ttl=0.6)
        assert await a.store(short) == 3
        assert await c.get("short") == {short.subkey: short}
        await anyio.sleep(0.7)
        assert await c.get("short") == {}
        assert a.local_entries("short") == {}


async def test_forged_records_are_rejected_by_the_storer() -> None:
    async with dht_nodes(3) as (a, b, c):
        fake = forged(identity_for(0), identity_for(2), "model/3", b"evil")
        with pytest.raises(ValueError, match="cannot store"):
            await c.store(fake)  # refused before any traffic
        # Sent anyway, straight to a storer: rejected there, the storer keeps serving.
        reply = await c._rpc.call(
            b.address, METHOD_STORE, Store(None, entries_to_wire([fake])), timeout=2
        )
        assert reply == StoreReply((StoreStatus.REJECTED,))
        assert b.local_entries("model/3") == {}
        garbage = await c._rpc.call(b.address, METHOD_STORE, Store(None, ([1, 2],)), timeout=2)
        assert garbage == StoreReply((StoreStatus.REJECTED,))
        real = entry(0, "model/3", b"good")
        assert await a.store(real) == 3
        assert await c.get("model/3") == {real.subkey: real}


async def test_store_refuses_entries_no_node_would_take() -> None:
    async with dht_nodes(2, config=DHTConfig(max_value_bytes=100, max_ttl=60.0)) as (a, _b):
        with pytest.raises(ValueError, match="value of 101 bytes"):
            await a.store(entry(0, "k", b"x" * 101))
        with pytest.raises(ValueError, match="max_ttl"):
            await a.store(entry(0, "k", ttl=120.0))
        with pytest.raises(ValueError, match="non-empty"):
            await a.get("")
        assert await a.store(entry(0, "k", ttl=-1.0)) == 0  # already expired: nobody keeps it


async def test_client_mode_stores_and_gets_but_stays_out_of_tables() -> None:
    async with dht_nodes(4, client=[3]) as nodes:
        servers, client = nodes[:3], nodes[3]
        assert client.client_mode and len(client.routing_table) == 3
        item = entry(3, "adapters/x", b"c")
        assert await client.store(item) == 3  # the client holds nothing for the swarm
        assert client.local_entries("adapters/x") == {}
        assert await client.get("adapters/x") == {item.subkey: item}
        assert await servers[0].get("adapters/x") == {item.subkey: item}
        for server in servers:
            assert client.peer_id not in server.routing_table
            assert all(e.peer_id != client.peer_id for e in server.routing_table)
        with pytest.raises(UnknownMethod):  # it serves no DHT calls
            await servers[0]._rpc.call(client.address, METHOD_PING, Ping(None), timeout=2)


async def test_get_caches_at_the_nearest_node_without_the_value() -> None:
    config = DHTConfig(call_timeout=2.0, maintenance_interval=3600.0, replication=1)
    async with dht_nodes(5, config=config) as nodes:
        key = "cached"
        target = key_id(key)
        by_distance = sorted(nodes, key=lambda n: n.peer_id.xor_distance(target))
        item = entry(0, key)
        assert await nodes[0].store(item) == 1
        assert [bool(n.local_entries(key)) for n in by_distance] == [True] + [False] * 4
        reader = by_distance[-1]
        assert await reader.get(key) == {item.subkey: item}

        def cached() -> int:
            return sum(bool(n.local_entries(key)) for n in nodes)

        with anyio.fail_after(5):
            while cached() < 2:  # noqa: ASYNC110 (the cache store runs in the background)
                await anyio.sleep(0.01)
        assert by_distance[1].local_entries(key) == {item.subkey: item}


async def test_maintenance_purges_and_republishes() -> None:
    config = DHTConfig(
        call_timeout=2.0, maintenance_interval=3600.0, replication=2, republish_interval=0.1
    )
    async with dht_nodes(5, config=config) as nodes:
        key = "republished"
        target = key_id(key)
        by_distance = sorted(nodes, key=lambda n: n.peer_id.xor_distance(target))
        item, gone = entry(0, key), entry(0, "gone", ttl=0.5)
        far = by_distance[-1]
        # Only the farthest node holds them (as after a cache store, or churn).
        reply = await nodes[0]._rpc.call(
            far.address, METHOD_STORE, Store(None, entries_to_wire([item, gone])), timeout=2
        )
        assert reply == StoreReply((StoreStatus.STORED, StoreStatus.STORED))
        assert far.record_count == 2
        await anyio.sleep(0.6)
        await far.maintain_once()
        assert far.record_count == 1  # "gone" expired and was purged
        assert [bool(n.local_entries(key)) for n in by_distance] == [True, True, False, False, True]
        assert await by_distance[2].get(key) == {item.subkey: item}


async def test_bootstrap_through_unreachable_peers_logs_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(2, network=network) as (rpc, other):
        network.kill(other.peer_id)  # nobody listens at its address any more
        node = DHTNode(rpc, identity_for(0), initial_peers=[other.address], config=FAST)
        with anyio.fail_after(5):
            async with node:
                assert len(node.routing_table) == 0
                assert await node.get("k") == {}
        assert "none of 1 initial peers answered" in caplog.text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": 0}, "k must be >= 1, got 0"),
        ({"alpha": 21}, "alpha must be in 1..k, got 21"),
        ({"replication": 0}, "replication must be in 1..k, got 0"),
        ({"get_quorum": 0}, "get_quorum must be None or >= 1, got 0"),
        ({"call_timeout": 0.0}, "call_timeout must be > 0, got 0.0"),
        ({"lookup_timeout": 1.0}, "lookup_timeout must be >= call_timeout, got 1.0"),
        ({"republish_interval": -1.0}, "republish_interval must be >= 0, got -1.0"),
        ({"max_ttl": float("nan")}, "max_ttl must be finite and > 0, got nan"),
        ({"max_record_bytes": 10}, "max_record_bytes must be >= 1024, got 10"),
    ],
)
def test_dht_config_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DHTConfig(**changes)  # type: ignore[arg-type]
    assert DHTConfig(get_quorum=None).get_quorum is None


async def test_construction_checks_identity_and_announced_address() -> None:
    async with memory_rpc_endpoints(1) as (rpc,):
        with pytest.raises(ValueError, match="not the identity"):
            DHTNode(rpc, identity_for(5))
        with pytest.raises(ValueError, match="public_address"):
            DHTNode(
                rpc, identity_for(0), public_address=PeerAddress(identity_for(5).peer_id, "h", 1)
            )
        wildcard = PeerAddress(rpc.peer_id, "0.0.0.0", 31337)
        with pytest.raises(ValueError, match="pass public_address"):
            await DHTNode(rpc, identity_for(0), public_address=wildcard).__aenter__()
        public = PeerAddress(rpc.peer_id, "192.0.2.1", 31337)
        async with DHTNode(rpc, identity_for(0), public_address=public) as node:
            assert node.address == public
            with pytest.raises(RuntimeError, match="only once"):
                await node.__aenter__()
