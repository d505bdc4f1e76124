"""A swarm of DHT nodes on the in-memory transport, for tests, benchmarks and embedders.

Each node is a memory endpoint, an RPC endpoint and a :class:`~distllm.dht.node.DHTNode`,
living in its own task of the swarm's task group: siblings, not one stack of hundreds of nested
cancel scopes (every checkpoint would walk them all). Joining runs concurrently, ``parallelism``
nodes at a time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc

from distllm.config import DHTConfig, RpcConfig, TransportConfig
from distllm.dht.driver import map_bounded
from distllm.dht.node import DHTNode
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.rpc import RpcEndpoint
from distllm.transport.memory import MemoryNetwork

__all__ = ["MemorySwarm", "memory_swarm", "swarm_identity"]


def swarm_identity(index: int) -> Identity:
    """The same identity for the same index in every run."""
    return Identity.from_seed(hashlib.sha256(b"distllm-dht-swarm:%d" % index).digest())


@dataclass
class MemorySwarm:
    """Nodes on one :class:`MemoryNetwork`; add them with :meth:`spawn`, join with
    :meth:`join`. Nodes run until the swarm's block ends or they are killed."""

    network: MemoryNetwork
    task_group: anyio.abc.TaskGroup
    config: DHTConfig
    rpc_config: RpcConfig
    transport_config: TransportConfig
    nodes: list[DHTNode] = field(default_factory=list)
    _processes: dict[PeerID, anyio.CancelScope] = field(
        default_factory=dict, init=False, repr=False
    )

    async def spawn(
        self, count: int, *, client_mode: bool = False, config: DHTConfig | None = None
    ) -> list[DHTNode]:
        """Start ``count`` nodes that know nobody yet."""
        started = []
        for _ in range(count):
            identity = swarm_identity(len(self.nodes))
            node = await self.task_group.start(
                self._run_node, identity, config or self.config, client_mode
            )
            self.nodes.append(node)
            started.append(node)
        return started

    async def _run_node(
        self,
        identity: Identity,
        config: DHTConfig,
        client_mode: bool,
        *,
        task_status: anyio.abc.TaskStatus[DHTNode],
    ) -> None:
        with anyio.CancelScope() as scope:
            self._processes[identity.peer_id] = scope
            async with (
                self.network.endpoint(identity, self.transport_config) as transport,
                RpcEndpoint(transport, self.rpc_config) as rpc,
                DHTNode(rpc, identity, config=config, client_mode=client_mode) as node,
            ):
                task_status.started(node)
                await anyio.sleep_forever()

    async def join(
        self,
        nodes: Sequence[DHTNode],
        via: Sequence[PeerAddress] | None = None,
        *,
        fanout: int = 3,
        parallelism: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        """Bootstrap ``nodes``: through ``via`` if given, else each through ``fanout`` random
        nodes of the swarm that joined before it (chains of joins, as in a real swarm)."""
        rng = rng or random.Random(0)
        joined = [n for n in self.nodes if n not in nodes]
        plans: list[tuple[DHTNode, list[PeerAddress]]] = []
        for node in nodes:
            if via is not None:
                peers = list(via)
            else:
                pool = joined or [n for n in self.nodes if n is not node][:1]
                peers = [n.address for n in rng.sample(pool, min(fanout, len(pool)))]
            plans.append((node, peers))
            joined.append(node)

        async def bootstrap(plan: tuple[DHTNode, list[PeerAddress]]) -> None:
            await plan[0].bootstrap(plan[1])

        await map_bounded(plans, bootstrap, parallelism)

    def kill(self, node: DHTNode, *, detect_immediately: bool = True) -> None:
        """The node's process dies: its endpoint drops off the network (see
        :meth:`MemoryNetwork.kill`) and its tasks stop."""
        self.network.kill(node.peer_id, detect_immediately=detect_immediately)
        self._processes[node.peer_id].cancel()


@asynccontextmanager
async def memory_swarm(
    size: int = 0,
    *,
    config: DHTConfig = DHTConfig(),  # noqa: B008 (frozen, shared on purpose)
    rpc_config: RpcConfig = RpcConfig(),  # noqa: B008
    transport_config: TransportConfig = TransportConfig(),  # noqa: B008
    network: MemoryNetwork | None = None,
    parallelism: int = 8,
) -> AsyncIterator[MemorySwarm]:
    """A swarm of ``size`` joined nodes (each through up to 3 random earlier ones)."""
    async with anyio.create_task_group() as tg:
        swarm = MemorySwarm(network or MemoryNetwork(), tg, config, rpc_config, transport_config)
        if size:
            await swarm.join(await swarm.spawn(size), parallelism=parallelism)
        yield swarm
        tg.cancel_scope.cancel()
