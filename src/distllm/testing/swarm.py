"""A whole swarm in one process on the in-memory transport: a DHT bootstrap node and span
servers, each in its own task (as if in its own process), for tests and embedders' examples.

    async with local_swarm(model_path, [(0, 2), (2, 4)]) as swarm:
        async with distllm.Client(swarm.initial_peers, transport=...) as client: ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from distllm.config import DHTConfig, RpcConfig, TransportConfig
from distllm.dht.node import DHTNode
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.model.resolve import ResolvedModel, resolve_model
from distllm.rpc import RpcEndpoint
from distllm.server.config import ServerConfig
from distllm.server.swarm_server import SwarmServer, SwarmServerOptions
from distllm.transport.memory import MemoryNetwork

__all__ = ["LocalSwarm", "local_swarm"]

#: Small caches and fast failure detection: what tests want.
TEST_SERVER_CONFIG = ServerConfig(cache_tokens=4096)
TEST_TRANSPORT_CONFIG = TransportConfig(keepalive_interval=0.1, dead_peer_timeout=0.5)
TEST_DHT_CONFIG = DHTConfig(call_timeout=1.0, lookup_timeout=5.0)


@dataclass
class LocalSwarm:
    network: MemoryNetwork
    model: ResolvedModel
    bootstrap: DHTNode
    task_group: anyio.abc.TaskGroup
    server_config: ServerConfig
    transport_config: TransportConfig
    dht_config: DHTConfig
    rpc_config: RpcConfig
    servers: list[SwarmServer] = field(default_factory=list)
    _scopes: dict[PeerID, anyio.CancelScope] = field(default_factory=dict, repr=False)

    @property
    def initial_peers(self) -> list[PeerAddress]:
        return [self.bootstrap.address]

    @property
    def model_name(self) -> str:
        return self.model.name

    async def add_server(
        self, start: int, end: int, *, server_config: ServerConfig | None = None
    ) -> SwarmServer:
        """Start a server for blocks ``[start, end)``; returns once it is ONLINE.
        ``server_config`` (e.g. with adapters) replaces the swarm's default for this server."""
        identity = Identity.generate()
        config = server_config if server_config is not None else self.server_config
        server: SwarmServer = await self.task_group.start(
            self._run_server, identity, start, end, config
        )
        self.servers.append(server)
        return server

    def stop(self, index: int) -> None:
        """Server ``index`` shuts down cleanly (announces OFFLINE, ends its sessions)."""
        self._scopes[self.servers[index].peer_id].cancel()

    def kill(self, index: int) -> None:
        """Server ``index`` dies abruptly: it drops off the network and its tasks stop. Peers
        notice after the transport's ``dead_peer_timeout``."""
        server = self.servers[index]
        self.network.kill(server.peer_id)
        self._scopes[server.peer_id].cancel()

    async def _run_server(
        self,
        identity: Identity,
        start: int,
        end: int,
        server_config: ServerConfig,
        *,
        task_status: anyio.abc.TaskStatus[SwarmServer],
    ) -> None:
        with anyio.CancelScope() as scope:
            self._scopes[identity.peer_id] = scope
            async with (
                self.network.endpoint(identity, self.transport_config) as transport,
                RpcEndpoint(transport, self.rpc_config) as rpc,
                SwarmServer(
                    rpc,
                    identity,
                    self.model,
                    initial_peers=self.initial_peers,
                    blocks=(start, end),
                    server_config=server_config,
                    dht_config=self.dht_config,
                    options=SwarmServerOptions(measure_throughput=False, announce_period=5.0),
                ) as server,
            ):
                task_status.started(server)
                await anyio.sleep_forever()


async def _run_bootstrap(
    network: MemoryNetwork,
    transport_config: TransportConfig,
    rpc_config: RpcConfig,
    dht_config: DHTConfig,
    *,
    task_status: anyio.abc.TaskStatus[DHTNode],
) -> None:
    identity = Identity.generate()
    async with (
        network.endpoint(identity, transport_config) as transport,
        RpcEndpoint(transport, rpc_config) as rpc,
        DHTNode(rpc, identity, config=dht_config) as node,
    ):
        task_status.started(node)
        await anyio.sleep_forever()


@asynccontextmanager
async def local_swarm(
    model_path: str | Path,
    spans: Sequence[tuple[int, int]],
    *,
    network: MemoryNetwork | None = None,
    model_name: str | None = None,
    server_config: ServerConfig | None = None,
    transport_config: TransportConfig | None = None,
    dht_config: DHTConfig | None = None,
    rpc_config: RpcConfig | None = None,
    server_configs: Sequence[ServerConfig | None] | None = None,
) -> AsyncIterator[LocalSwarm]:
    """A bootstrap DHT node plus one server per span, all ONLINE when the block starts.

    ``server_configs`` (one per span; ``None`` entries use ``server_config``) lets servers
    differ, e.g. in the LoRA adapters they load."""
    if server_configs is not None and len(server_configs) != len(spans):
        raise ValueError(f"{len(server_configs)} server_configs for {len(spans)} spans")
    network = network or MemoryNetwork()
    transport_config = transport_config or TEST_TRANSPORT_CONFIG
    rpc_config = rpc_config or RpcConfig()
    dht_config = dht_config or TEST_DHT_CONFIG
    async with anyio.create_task_group() as tg:
        bootstrap = await tg.start(
            _run_bootstrap, network, transport_config, rpc_config, dht_config
        )
        swarm = LocalSwarm(
            network=network,
            model=resolve_model(model_path, name=model_name),
            bootstrap=bootstrap,
            task_group=tg,
            server_config=server_config or TEST_SERVER_CONFIG,
            transport_config=transport_config,
            dht_config=dht_config,
            rpc_config=rpc_config,
        )
        for index, (start, end) in enumerate(spans):
            config = server_configs[index] if server_configs is not None else None
            await swarm.add_server(start, end, server_config=config)
        yield swarm
        tg.cancel_scope.cancel()
