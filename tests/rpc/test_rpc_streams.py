"""Bidirectional message streams over the in-memory transport."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import numpy as np
import pytest

from distllm.config import RpcConfig
from distllm.errors import Busy, DeadlineExceeded, PeerGone, RemoteError, RemoteProtocolError
from distllm.rpc import RpcEndpoint, RpcStream, UnknownMethod
from distllm.testing import MemoryNetwork, eventually, memory_rpc_endpoints
from distllm.wire.messages import message
from distllm.wire.tensors import WireTensor

pytestmark = pytest.mark.anyio


@message("test.rpc_streams.step")
@dataclass(frozen=True, slots=True)
class Step:
    index: int
    hidden: WireTensor | None = None


@message("test.rpc_streams.total")
@dataclass(frozen=True, slots=True)
class Total:
    index: int
    total: float


async def running_sum(stream: RpcStream) -> None:
    """Answers each step with the running sum of its tensor's elements."""
    total = 0.0
    async for item in stream:
        if not isinstance(item, Step) or item.hidden is None:
            raise TypeError(f"expected a Step with a tensor, got {item!r}")
        total += float(item.hidden.to_numpy().sum())
        await stream.send(Total(item.index, total))


async def explode_after_two(stream: RpcStream) -> None:
    for _ in range(2):
        step = await stream.receive_as(Step)
        await stream.send(Total(step.index, 0.0))
    raise ValueError("third step refused")


async def send_steps(stream: RpcStream, count: int) -> None:
    for i in range(count):
        await stream.send(Step(i))


async def fail_inside_stream_block(client: RpcEndpoint, server: RpcEndpoint) -> None:
    async with client.open_stream(server.address, "wait") as stream:
        await stream.send(Step(0))
        raise KeyError("caller bug")


def install(server: RpcEndpoint) -> None:
    server.add_stream("sum", running_sum)
    server.add_stream("explode", explode_after_two)


async def test_stream_exchanges_many_messages() -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(2, network=network) as (server, client):
        install(server)
        seen = []
        async with client.open_stream(server.address, "sum", timeout=30) as stream:
            assert stream.remote_peer == server.peer_id
            expected = 0.0
            for i in range(500):
                values = np.full((2, 8), i, dtype=np.float32)
                await stream.send(Step(i, WireTensor.from_numpy(values)))
                reply = await stream.receive_as(Total)
                expected += 16.0 * i
                assert (reply.index, reply.total) == (i, expected)
                seen.append(reply.index)
            await stream.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
        assert seen == list(range(500))
        await eventually(lambda: network.open_streams() == 0)


async def test_pipelined_sends_and_receives_in_separate_tasks() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        totals: list[float] = []
        async with client.open_stream(server.address, "sum") as stream:

            async def produce() -> None:
                for i in range(200):
                    await stream.send(Step(i, WireTensor.from_numpy(np.ones(4, np.float32))))
                await stream.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                async for reply in stream:
                    assert isinstance(reply, Total)
                    totals.append(reply.total)
        assert totals == [4.0 * (i + 1) for i in range(200)]


async def test_handler_error_ends_the_stream_with_remote_error() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        async with client.open_stream(server.address, "explode") as stream:
            for i in range(2):
                await stream.send(Step(i))
                assert await stream.receive_as(Total) == Total(i, 0.0)
            await stream.send(Step(2))
            with pytest.raises(RemoteError) as info:
                await stream.receive()
            assert (info.value.type_name, info.value.message) == (
                "ValueError",
                "third step refused",
            )
            with pytest.raises(RemoteError):  # it stays failed
                await stream.receive()


async def test_send_after_the_callee_failed_reports_its_error() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        async with client.open_stream(server.address, "missing") as stream:
            await anyio.sleep(0.01)  # the callee answered and closed meanwhile
            with pytest.raises(UnknownMethod):  # not PeerGone: its error frame came first
                await send_steps(stream, 100)


async def test_unknown_method_on_first_receive() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        async with client.open_stream(server.address, "missing") as stream:
            with pytest.raises(UnknownMethod):
                await stream.receive()


async def test_stream_calls_count_against_the_concurrency_limit() -> None:
    config = RpcConfig(max_concurrent_calls_per_peer=1)
    async with memory_rpc_endpoints(2, config=config) as (server, client):
        install(server)
        async with client.open_stream(server.address, "sum") as first:
            await first.send(Step(0, WireTensor.from_numpy(np.ones(1, np.float32))))
            assert await first.receive_as(Total) == Total(0, 1.0)
            async with client.open_stream(server.address, "sum") as second:
                with pytest.raises(Busy):
                    await second.receive()


async def test_stream_deadline() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        start = anyio.current_time()
        with pytest.raises(DeadlineExceeded):
            async with client.open_stream(server.address, "sum", timeout=0.2) as stream:
                await stream.receive()  # the callee waits for us: nothing comes
        assert anyio.current_time() - start == pytest.approx(0.2, abs=0.1)


async def test_leaving_the_block_by_an_exception_resets_and_frees_the_callee() -> None:
    network = MemoryNetwork()
    handler_failed = anyio.Event()
    outcome: list[BaseException] = []

    async def wait_for_more(stream: RpcStream) -> None:
        try:
            await stream.receive()
            await stream.receive()
        except PeerGone as exc:
            outcome.append(exc)
            handler_failed.set()
            raise

    async with memory_rpc_endpoints(2, network=network) as (server, client):
        server.add_stream("wait", wait_for_more)
        with pytest.raises(KeyError):
            await fail_inside_stream_block(client, server)
        with anyio.fail_after(1):
            await handler_failed.wait()
        await eventually(lambda: network.open_streams() == 0)
        assert server.active_calls(client.peer_id) == 0


async def test_callee_receives_a_wrong_type() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        async with client.open_stream(server.address, "explode") as stream:
            await stream.send(Total(0, 0.0))
            with pytest.raises(RemoteError) as info:
                await stream.receive()
            assert info.value.type_name == "RemoteProtocolError"
        async with client.open_stream(server.address, "explode") as stream:
            await stream.send(Step(0))
            await stream.receive_as(Total)
            await stream.send(Step(1))
            with pytest.raises(RemoteProtocolError, match="expected Step, got Total"):
                await stream.receive_as(Step)
