"""Shared by the client tests: tiny checkpoints, in-memory swarms with a client, references."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch

from distllm.client import Client, ClientConfig, RemoteModel
from distllm.config import DHTConfig, TransportConfig
from distllm.identity import Identity
from distllm.ids import PeerID
from distllm.server.config import ServerConfig
from distllm.testing import eventually
from distllm.testing.models import make_tiny_model
from distllm.testing.swarm import TEST_TRANSPORT_CONFIG, LocalSwarm, local_swarm

#: Fast failure detection and small bans: failovers take well under a second.
FAST = ClientConfig(
    step_timeout=2.0,
    connect_timeout=1.0,
    close_timeout=0.5,
    max_retries=4,
    failover_timeout=3.0,
    ban_base=0.2,
    ban_cap=2.0,
    refresh_period=None,
    refresh_timeout=2.0,
    min_refresh_interval=0.2,
    dht=DHTConfig(call_timeout=0.5, lookup_timeout=2.0, get_quorum=None),
)
#: Servers give up relaying to a dead next server well within the clients' step deadlines
#: (down to 0.4 s here): a relaying server answers its client only after trying.
SERVER_CONFIG = ServerConfig(cache_tokens=1024, page_size=4, max_length=256, relay_timeout=0.15)


@functools.cache
def tiny_model(family: str, root: Path, **overrides: Any) -> Path:
    """A tiny random checkpoint with a tokenizer, made once per family (and overrides)."""
    name = family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    return make_tiny_model(family, root / name, **overrides)


@functools.cache
def hf_model(path: Path) -> Any:
    """The same checkpoint in ``transformers``: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@dataclass
class Harness:
    swarm: LocalSwarm
    client: Client
    model: RemoteModel

    def server_index(self, peer: object) -> int:
        return next(i for i, s in enumerate(self.swarm.servers) if s.peer_id == peer)

    def black_hole(self, peer: PeerID) -> None:
        """``peer``'s machine vanishes: nothing it sends or is sent arrives any more (as after a
        kill -9 or a power cut: its peers notice after ``dead_peer_timeout``, dials time out).

        (``LocalSwarm.kill`` would be the direct way, but the killed server's shutdown then
        runs over its dead endpoint and crashes the swarm's task group; healed at the end of
        :func:`swarm_client`, the server here shuts down normally.)
        """
        others = [self.swarm.bootstrap.peer_id, self.client.peer_id]
        others += [s.peer_id for s in self.swarm.servers if s.peer_id != peer]
        self.swarm.network.partition([peer], others)

    async def assert_clean(self) -> None:
        """No stream of the client left open; no live server holds a session or a page."""
        network = self.swarm.network

        def clean() -> bool:
            if network.stats(self.client.peer_id).open_streams:
                return False
            for server in self.swarm.servers:
                try:
                    info = server.server.info()
                except RuntimeError:  # stopped or killed
                    continue
                if info.sessions or info.free_cache_tokens != info.total_cache_tokens:
                    return False
            return True

        await eventually(clean, within=5.0)


@asynccontextmanager
async def swarm_client(
    path: Path,
    spans: Sequence[tuple[int, int]],
    *,
    config: ClientConfig = FAST,
    server_config: ServerConfig = SERVER_CONFIG,
    transport_config: TransportConfig = TEST_TRANSPORT_CONFIG,
    server_configs: Sequence[ServerConfig | None] | None = None,
) -> AsyncIterator[Harness]:
    """A local swarm serving ``spans`` of the checkpoint at ``path``, and a client of it
    (``server_configs``: one per span, ``None`` for ``server_config``)."""
    async with local_swarm(
        path,
        spans,
        server_config=server_config,
        transport_config=transport_config,
        server_configs=server_configs,
    ) as swarm:
        identity = Identity.generate()
        async with (
            swarm.network.endpoint(identity, transport_config) as transport,
            Client(
                swarm.initial_peers, identity=identity, transport=transport, config=config
            ) as client,
        ):
            model = await client.model(path)

            async def complete() -> bool:  # DHT reads are eventually consistent
                await model.refresh()
                return len(model.router.view.servers) == len(swarm.servers)

            with anyio.fail_after(10):
                while not await complete():  # noqa: ASYNC110 (polling the DHT)
                    await anyio.sleep(0.05)
            try:
                yield Harness(swarm, client, model)
            finally:
                swarm.network.heal()  # black-holed servers may shut down cleanly


def hf_greedy(path: Path, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` ``[1, T]`` by local ``transformers``."""
    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=3)
    return [int(t) for t in out[0, ids.shape[1] :]]
