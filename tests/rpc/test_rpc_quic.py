"""RPC over real QUIC on loopback: the same semantics as over the in-memory transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import numpy as np
import pytest

from distllm.config import RpcConfig, TransportConfig
from distllm.errors import Busy, DeadlineExceeded, PeerGone, RemoteError
from distllm.ids import PeerID
from distllm.rpc import RpcEndpoint, RpcStream, UnknownMethod
from distllm.testing import eventually, identity_for
from distllm.wire.messages import message
from distllm.wire.tensors import WireTensor

quic = pytest.importorskip("distllm.transport.quic")

pytestmark = pytest.mark.anyio

TRANSPORT = TransportConfig(max_datagram_size=16384, keepalive_interval=0.2, dead_peer_timeout=1.0)
CONFIG = RpcConfig()


@message("test.rpc_quic.tensor")
@dataclass(frozen=True, slots=True)
class Tensor:
    value: WireTensor
    delay: float = 0.0


async def double(caller: PeerID, request: Tensor) -> Tensor:
    await anyio.sleep(request.delay)
    if request.value.numel == 0:
        raise ValueError("empty tensor")
    return Tensor(WireTensor.from_numpy(request.value.to_numpy() * 2))


async def doubling_stream(stream: RpcStream) -> None:
    async for item in stream:
        assert isinstance(item, Tensor)
        await stream.send(Tensor(WireTensor.from_numpy(item.value.to_numpy() * 2)))


@asynccontextmanager
async def quic_rpc_endpoint(index: int, config: RpcConfig = CONFIG) -> AsyncIterator[RpcEndpoint]:
    """An RPC endpoint on a loopback QUIC endpoint, serving ``double`` and ``doubling``."""
    async with (
        quic.QuicEndpoint(identity_for(index), host="127.0.0.1", port=0, config=TRANSPORT) as t,
        RpcEndpoint(t, config) as endpoint,
    ):
        endpoint.add_unary("double", double, Tensor)
        endpoint.add_stream("doubling", doubling_stream)
        yield endpoint


@asynccontextmanager
async def quic_rpc_pair(config: RpcConfig = CONFIG) -> AsyncIterator[tuple[RpcEndpoint, ...]]:
    async with quic_rpc_endpoint(0, config) as server, quic_rpc_endpoint(1, config) as client:
        yield server, client


def tensor(n: int, delay: float = 0.0) -> Tensor:
    return Tensor(WireTensor.from_numpy(np.arange(n, dtype=np.float32)), delay)


async def test_unary_with_a_large_tensor_and_errors() -> None:
    async with quic_rpc_pair() as (server, client):
        with anyio.fail_after(20):
            reply = await client.call(
                server.address, "double", tensor(1_000_000), response_type=Tensor
            )
            np.testing.assert_array_equal(
                reply.value.to_numpy(), np.arange(1_000_000, dtype=np.float32) * 2
            )
            with pytest.raises(RemoteError) as info:
                await client.call(server.address, "double", tensor(0))
            assert info.value.type_name == "ValueError"
            with pytest.raises(UnknownMethod):
                await client.call(server.address, "triple", tensor(1))
            assert (await client.call(server.address, "double", tensor(3))) == Tensor(
                WireTensor.from_numpy(np.array([0, 2, 4], np.float32))
            )


async def test_stream_many_messages() -> None:
    async with quic_rpc_pair() as (server, client):
        with anyio.fail_after(20):
            async with client.open_stream(server.address, "doubling") as stream:
                for i in range(200):
                    await stream.send(tensor(i + 1))
                    reply = await stream.receive_as(Tensor)
                    assert reply.value.to_numpy()[-1] == 2 * i


async def test_deadline_busy_and_concurrency() -> None:
    async with quic_rpc_pair(RpcConfig(max_concurrent_calls_per_peer=64)) as (server, client):
        with anyio.fail_after(20):
            with pytest.raises(DeadlineExceeded):
                await client.call(server.address, "double", tensor(1, delay=5.0), timeout=0.3)
            await eventually(lambda: server.active_calls(client.peer_id) == 0)  # reset arrived
            busy = 0

            async def one() -> None:
                nonlocal busy
                try:
                    await client.call(server.address, "double", tensor(4, delay=1.0))
                except Busy:
                    busy += 1

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(one)
            assert busy == 36  # 64 run at once; the rest are told so at once


async def test_peer_gone_when_callee_endpoint_closes() -> None:
    stop_server = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[RpcEndpoint]) -> None:
        async with quic_rpc_endpoint(0) as server:
            task_status.started(server)
            await stop_server.wait()

    async with quic_rpc_endpoint(1) as client, anyio.create_task_group() as tg:
        server = await tg.start(run_server)
        await client.call(server.address, "double", tensor(1))  # connected

        async def stop_soon() -> None:
            await anyio.sleep(0.2)
            stop_server.set()

        tg.start_soon(stop_soon)
        with anyio.fail_after(TRANSPORT.dead_peer_timeout + 2), pytest.raises(PeerGone):
            await client.call(server.address, "double", tensor(1, delay=10.0), timeout=10)
