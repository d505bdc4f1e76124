"""Fakes and helpers shared by distllm's tests and by applications that embed distllm."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

from distllm.config import RpcConfig, TransportConfig
from distllm.identity import Identity
from distllm.rpc import RpcEndpoint
from distllm.transport.memory import EndpointStats, MemoryEndpoint, MemoryNetwork, MemoryStream

__all__ = [
    "EndpointStats",
    "MemoryEndpoint",
    "MemoryNetwork",
    "MemoryStream",
    "eventually",
    "identity_for",
    "memory_endpoints",
    "memory_rpc_endpoints",
]

_DEFAULT_CONFIG = TransportConfig()
_DEFAULT_RPC_CONFIG = RpcConfig()


async def eventually(
    condition: Callable[[], bool], *, within: float = 5.0, interval: float = 0.005
) -> None:
    """Wait until ``condition()`` holds (polled every ``interval`` s); ``TimeoutError`` after
    ``within`` s. For effects that land a few scheduling steps after the call a test awaited,
    e.g. a callee closing its end of a stream."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (polling a plain predicate on purpose)
            await anyio.sleep(interval)


def identity_for(index: int) -> Identity:
    """The same identity for the same index in every run (readable, reproducible tests)."""
    return Identity.from_seed(hashlib.sha256(b"distllm-test-identity:%d" % index).digest())


@asynccontextmanager
async def memory_endpoints(
    n: int,
    *,
    network: MemoryNetwork | None = None,
    config: TransportConfig = _DEFAULT_CONFIG,
    first_index: int = 0,
) -> AsyncIterator[list[MemoryEndpoint]]:
    """``n`` entered endpoints on ``network`` (a new one if omitted; reach it as
    ``endpoints[0].network``), with identities ``identity_for(first_index + i)``."""
    network = network if network is not None else MemoryNetwork()
    async with AsyncExitStack() as stack:
        endpoints = [
            await stack.enter_async_context(network.endpoint(identity_for(first_index + i), config))
            for i in range(n)
        ]
        yield endpoints


@asynccontextmanager
async def memory_rpc_endpoints(
    n: int,
    *,
    network: MemoryNetwork | None = None,
    config: RpcConfig = _DEFAULT_RPC_CONFIG,
    transport_config: TransportConfig = _DEFAULT_CONFIG,
    first_index: int = 0,
) -> AsyncIterator[list[RpcEndpoint]]:
    """``n`` entered RPC endpoints over :func:`memory_endpoints`; pass your own ``network`` to
    inject faults."""
    async with (
        memory_endpoints(
            n, network=network, config=transport_config, first_index=first_index
        ) as transports,
        AsyncExitStack() as stack,
    ):
        yield [
            await stack.enter_async_context(RpcEndpoint(transport, config))
            for transport in transports
        ]
