"""DHTNode against misbehaving peers: silent ones, liars, malformed replies, dead nodes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
import pytest

from distllm.config import DHTConfig
from distllm.dht.messages import (
    METHOD_FIND_NODE,
    METHOD_FIND_VALUE,
    METHOD_PING,
    METHOD_STORE,
    Contact,
    FindNode,
    FindValue,
    Nodes,
    Ping,
    Pong,
    Store,
    Values,
    entries_to_wire,
)
from distllm.dht.node import DHTNode
from distllm.dht.records import SignedEntry, peer_subkey, sign_entry, signing_payload
from distllm.errors import ConnectError
from distllm.ids import PeerAddress, PeerID
from distllm.rpc import RpcEndpoint
from distllm.testing import MemoryNetwork, identity_for, memory_rpc_endpoints

pytestmark = pytest.mark.anyio

SHORT = DHTConfig(call_timeout=0.3, maintenance_interval=3600.0)

Handler = Callable[[PeerID, object], Awaitable[object]]


async def silent(caller: PeerID, request: object) -> object:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def pong(caller: PeerID, request: object) -> Pong:
    return Pong()


def serve_fake(rpc: RpcEndpoint, find: Handler, store: Handler = silent) -> None:
    """A peer that answers pings and handles the rest its own way."""
    rpc.add_unary(METHOD_PING, pong, Ping)
    rpc.add_unary(METHOD_FIND_NODE, find, FindNode)
    rpc.add_unary(METHOD_FIND_VALUE, find, FindValue)
    rpc.add_unary(METHOD_STORE, store, Store)


async def introduce(fake: RpcEndpoint, node: DHTNode) -> None:
    """``fake`` calls ``node`` with its true address, so ``node`` adds it to its table."""
    await fake.call(node.address, METHOD_PING, Ping(Contact.of(fake.address)), timeout=2)
    assert fake.peer_id in node.routing_table


async def test_a_peer_that_never_answers_is_timed_out_and_charged() -> None:
    async with memory_rpc_endpoints(2) as (rpc, fake):
        serve_fake(fake, silent)
        async with DHTNode(rpc, identity_for(0), config=SHORT) as node:
            await introduce(fake, node)
            started = anyio.current_time()
            with anyio.fail_after(5):
                assert await node.get("k") == {}
            assert 0.3 <= anyio.current_time() - started < 2.0
            entry = node.routing_table.get(fake.peer_id)
            assert entry is not None and entry.failures == 1
            with anyio.fail_after(5):
                await node.find_nodes(bytes(32))
                await node.find_nodes(bytes(32))
            assert fake.peer_id not in node.routing_table  # evicted after max_failures
            assert node.stats.failures == 3


async def test_malformed_replies_do_not_break_lookups() -> None:
    liar = identity_for(9)

    def forged_entry(key: str) -> SignedEntry:
        subkey = peer_subkey(identity_for(0).peer_id)
        expiration = time.time() + 60
        signature = liar.sign(signing_payload(key, subkey, b"evil", expiration))
        return SignedEntry(key, subkey, b"evil", expiration, liar.public_key_bytes, signature)

    async def bad_port(caller: PeerID, request: object) -> Nodes:
        return Nodes((Contact(identity_for(8).peer_id, "mem", 0),))

    async def wrong_type(caller: PeerID, request: object) -> Pong:
        return Pong()

    async def forged_values(caller: PeerID, request: object) -> Values:
        key = request.key if isinstance(request, FindValue) else "x"
        return Values((), entries_to_wire([forged_entry(key)]))

    async def other_key(caller: PeerID, request: object) -> Values:
        return Values((), entries_to_wire([sign_entry(liar, "other", b"x", time.time() + 60)]))

    async def garbage(caller: PeerID, request: object) -> Values:
        return Values((), ([1, 2, 3],))

    handlers = [bad_port, wrong_type, forged_values, other_key, garbage]
    network = MemoryNetwork()
    async with (
        memory_rpc_endpoints(3, network=network) as honest,
        memory_rpc_endpoints(len(handlers), network=network, first_index=10) as fakes,
        AsyncExitStack() as stack,
    ):
        a, b, reader = [
            await stack.enter_async_context(DHTNode(rpc, identity_for(i), config=SHORT))
            for i, rpc in enumerate(honest)
        ]
        await b.bootstrap([a.address])
        item = sign_entry(identity_for(1), "model/0", b"good", time.time() + 60)
        assert await b.store(item) == 2
        await reader.bootstrap([a.address])
        for fake, handler in zip(fakes, handlers, strict=True):
            serve_fake(fake, handler)
            await introduce(fake, reader)
        assert len(reader.routing_table) == 2 + len(handlers)
        with anyio.fail_after(5):
            assert await reader.get("model/0") == {item.subkey: item}
            nodes = await reader.find_nodes(a.peer_id.digest)
        assert nodes[0] == a.address
        assert {n.peer_id for n in nodes} == {a.peer_id, b.peer_id}
        for fake in fakes:  # every liar was asked, failed, and was charged
            entry = reader.routing_table.get(fake.peer_id)
            assert entry is not None and entry.failures >= 1, fake.peer_id
        assert a.local_entries("model/0") == {item.subkey: item}


async def test_killed_nodes_are_charged_and_lookups_go_on() -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(4, network=network) as rpcs, AsyncExitStack() as stack:
        nodes: list[DHTNode] = []
        for i, rpc in enumerate(rpcs):
            initial = [nodes[0].address] if nodes else []
            node = DHTNode(rpc, identity_for(i), initial_peers=initial, config=SHORT)
            nodes.append(await stack.enter_async_context(node))
        item = sign_entry(identity_for(0), "k", b"v", time.time() + 60)
        assert await nodes[0].store(item) == 4
        network.kill(nodes[3].peer_id)  # silent: peers notice at their call deadline
        with anyio.fail_after(5):
            assert await nodes[1].get("k") == {item.subkey: item}
            found = await nodes[1].find_nodes(nodes[3].peer_id.digest)
        assert nodes[3].address not in found
        entry = nodes[1].routing_table.get(nodes[3].peer_id)
        assert entry is None or entry.failures >= 1


async def test_a_referral_neither_moves_nor_blames_a_known_contact() -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(2, network=network) as (rpc_a, rpc_b), AsyncExitStack() as st:
        a = await st.enter_async_context(DHTNode(rpc_a, identity_for(0), config=SHORT))
        b = await st.enter_async_context(
            DHTNode(rpc_b, identity_for(1), initial_peers=[a.address], config=SHORT)
        )
        # A liar names b at an address where nothing listens. A call "there" reuses the live
        # connection to b and succeeds; a fresh dial fails. Neither may touch b's entry.
        bogus = PeerAddress(b.peer_id, "mem", 9)
        a._seen(bogus)
        entry = a.routing_table.get(b.peer_id)
        assert entry is not None and entry.address == b.address
        a._failed(bogus, ConnectError("nothing listens there"))
        entry = a.routing_table.get(b.peer_id)
        assert entry is not None and entry.failures == 0
        a._failed(b.address, ConnectError("real failure"))  # at its own address: charged
        entry = a.routing_table.get(b.peer_id)
        assert entry is not None and entry.failures == 1
