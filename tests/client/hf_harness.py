"""The HF face over an in-memory swarm: a portal thread runs the swarm and a client, and the
model borrows both (``from_pretrained(..., client=, portal=)``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from anyio.from_thread import start_blocking_portal

from distllm.client import Client
from distllm.client.hf import DistributedModelForCausalLM
from distllm.identity import Identity
from distllm.ids import PeerID
from distllm.testing.swarm import LocalSwarm, local_swarm


@asynccontextmanager
async def swarm_and_client(
    path: Path, spans: Sequence[tuple[int, int]]
) -> AsyncIterator[tuple[LocalSwarm, Client]]:
    async with local_swarm(path, spans) as swarm:
        identity = Identity.generate()
        async with (
            swarm.network.endpoint(identity, swarm.transport_config) as transport,
            Client(swarm.initial_peers, identity=identity, transport=transport) as client,
        ):
            yield swarm, client


@contextmanager
def distributed(
    path: Path,
    spans: Sequence[tuple[int, int]] = ((0, 2), (2, 4)),
    backend: str = "asyncio",
    **kwargs: Any,
) -> Iterator[tuple[DistributedModelForCausalLM, LocalSwarm]]:
    """``(model, swarm)``: ``path``'s blocks served by one server per span."""
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(swarm_and_client(path, spans)) as (swarm, client),
    ):
        model = DistributedModelForCausalLM.from_pretrained(
            path, client=client, portal=portal, **kwargs
        )
        with model:
            yield model, swarm


def open_sessions(swarm: LocalSwarm) -> int:
    """Inference sessions open on the swarm's servers right now."""
    return sum(server.server.info().sessions for server in swarm.servers)


def eventually_sync(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.01)


def stop_server(model: DistributedModelForCausalLM, swarm: LocalSwarm, peer: PeerID) -> None:
    """Stop the swarm's server ``peer`` (its sessions end), from the model's synchronous side.

    (``LocalSwarm.kill`` would be the abrupt variant; today the killed server's own shutdown
    fails on the network it was cut from and brings the whole local swarm down.)
    """
    index = next(i for i, s in enumerate(swarm.servers) if s.peer_id == peer)
    model._runtime.portal.call(swarm.stop, index)
