"""A 16-node DHT on loopback QUIC (real UDP sockets): chain bootstrap, store/get, forgery."""

from __future__ import annotations

import time

import anyio
import anyio.abc
import pytest

from distllm.config import DHTConfig, TransportConfig
from distllm.dht.messages import METHOD_STORE, Store, StoreReply, StoreStatus, entries_to_wire
from distllm.dht.node import DHTNode
from distllm.dht.records import SignedEntry, peer_subkey, sign_entry, signing_payload
from distllm.ids import PeerAddress
from distllm.rpc import RpcEndpoint
from distllm.testing import identity_for

quic = pytest.importorskip("distllm.transport.quic")

pytestmark = pytest.mark.anyio

TRANSPORT = TransportConfig(max_datagram_size=16384)
CONFIG = DHTConfig(call_timeout=5.0, maintenance_interval=3600.0)


async def run_node(
    index: int,
    initial: list[PeerAddress],
    *,
    task_status: anyio.abc.TaskStatus[DHTNode],
) -> None:
    identity = identity_for(index)
    async with (
        quic.QuicEndpoint(identity, host="127.0.0.1", port=0, config=TRANSPORT) as transport,
        RpcEndpoint(transport) as rpc,
        DHTNode(rpc, identity, initial_peers=initial, config=CONFIG) as node,
    ):
        task_status.started(node)
        await anyio.sleep_forever()


async def test_16_nodes_on_loopback_quic() -> None:
    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            nodes: list[DHTNode] = []
            for index in range(16):  # a chain: each joins through the one before it
                initial = [nodes[-1].address] if nodes else []
                nodes.append(await tg.start(run_node, index, initial))
            assert all(len(node.routing_table) >= 8 for node in nodes)

            items = [
                sign_entry(identity_for(i), f"model/{i}", b"server %d" % i, time.time() + 60)
                for i in range(16)
            ]
            counts = await nodes[0].store_many(items)  # relayed: signatures still hold
            assert counts == [CONFIG.replication] * 16
            found = await nodes[15].get_many([item.key for item in items])
            assert found == {item.key: {item.subkey: item} for item in items}

            victim, forger = identity_for(3), identity_for(7)
            expiration = time.time() + 60
            subkey = peer_subkey(victim.peer_id)
            payload = signing_payload("model/3", subkey, b"evil", expiration)
            fake = SignedEntry(
                "model/3",
                subkey,
                b"evil",
                expiration,
                forger.public_key_bytes,
                forger.sign(payload),
            )
            for holder in nodes[1:4]:
                reply = await nodes[7]._rpc.call(
                    holder.address, METHOD_STORE, Store(None, entries_to_wire([fake])), timeout=5
                )
                assert reply == StoreReply((StoreStatus.REJECTED,))
            assert await nodes[9].get("model/3") == {items[3].subkey: items[3]}
            tg.cancel_scope.cancel()
