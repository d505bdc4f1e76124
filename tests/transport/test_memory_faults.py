"""Fault injection and bookkeeping of the in-memory transport (beyond the shared contract)."""

from __future__ import annotations

import itertools
import logging

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from distllm.config import TransportConfig
from distllm.errors import ConnectError, PeerGone
from distllm.testing import MemoryNetwork, eventually, identity_for, memory_endpoints
from distllm.transport.base import Stream

pytestmark = pytest.mark.anyio

CONFIG = TransportConfig(connect_timeout=0.5, keepalive_interval=0.1, dead_peer_timeout=0.3)
EPS = 0.05


@pytest.fixture(params=["asyncio", "trio-mockclock"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Timeouts are short on asyncio and instant on trio (MockClock jumps when all sleep)."""
    if request.param == "asyncio":
        return "asyncio"
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def read_all(stream: Stream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


async def echo(stream: Stream) -> None:
    await stream.send(await read_all(stream))
    await stream.send_eof()


async def silent(stream: Stream) -> None:
    await anyio.sleep_forever()


async def pending_receive_fails_after(stream: Stream) -> float:
    start = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(PeerGone):
        await stream.receive()
    return anyio.current_time() - start


async def test_kill_is_detected_after_dead_peer_timeout() -> None:
    cancelled = anyio.Event()

    async def handler(stream: Stream) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(handler)
        network = server.network
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"x")
            await anyio.sleep(0.01)
            network.kill(server.peer_id)
            with anyio.fail_after(1):
                await cancelled.wait()  # the dead process's handlers stop at once
            assert client.is_connected(server.peer_id)  # nobody noticed yet
            elapsed = await pending_receive_fails_after(stream)
            assert CONFIG.dead_peer_timeout - EPS <= elapsed <= CONFIG.dead_peer_timeout + EPS
            assert not client.is_connected(server.peer_id)
        with pytest.raises(ConnectError):
            await client.open_stream(server.address)


async def test_kill_detected_immediately() -> None:
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(silent)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"x")
            server.network.kill(server.peer_id, detect_immediately=True)
            assert await pending_receive_fails_after(stream) <= EPS


async def test_restart_with_same_identity_after_kill() -> None:
    network = MemoryNetwork()
    async with memory_endpoints(2, network=network, config=CONFIG) as (server, client):
        network.kill(server.peer_id, detect_immediately=True)
        async with network.endpoint(identity_for(0), CONFIG) as reborn:
            reborn.set_stream_handler(echo)
            async with await client.open_stream(reborn.address) as stream:
                await stream.send(b"back")
                await stream.send_eof()
                assert await read_all(stream) == b"back"


async def test_partition_kills_connections_and_blocks_dials() -> None:
    async with memory_endpoints(3, config=CONFIG) as (server, client, bystander):
        server.set_stream_handler(echo)
        network = server.network
        async with await client.open_stream(server.address) as stream:
            network.partition([client.peer_id], [server.peer_id])
            await stream.send(b"lost")
            await stream.send_eof()
            elapsed = await pending_receive_fails_after(stream)
            assert CONFIG.dead_peer_timeout - EPS <= elapsed <= CONFIG.dead_peer_timeout + EPS
        start = anyio.current_time()
        with pytest.raises(ConnectError):
            await client.open_stream(server.address)
        assert anyio.current_time() - start >= CONFIG.connect_timeout - EPS
        async with await bystander.open_stream(server.address) as other:  # not partitioned
            await other.send_eof()
            assert await read_all(other) == b""
        network.heal()
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"healed")
            await stream.send_eof()
            assert await read_all(stream) == b"healed"


async def test_short_partition_heals_without_loss() -> None:
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(echo)
        network = server.network
        async with await client.open_stream(server.address) as stream:
            network.partition([client.peer_id], [server.peer_id])
            await stream.send(b"held back")
            await stream.send_eof()
            with anyio.move_on_after(CONFIG.dead_peer_timeout / 2) as scope:
                await stream.receive()
            assert scope.cancelled_caught
            network.heal()
            with anyio.fail_after(1):
                assert await read_all(stream) == b"held back"


async def test_latency_delays_each_direction() -> None:
    latency = 0.05
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(echo)
        server.network.set_latency(latency)
        start = anyio.current_time()
        async with await client.open_stream(server.address) as stream:
            assert anyio.current_time() - start >= 2 * latency - EPS / 5  # handshake
            start = anyio.current_time()
            await stream.send(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"ping"
            elapsed = anyio.current_time() - start
            assert 2 * latency - EPS / 5 <= elapsed <= 2 * latency + EPS


async def test_stats_count_streams_and_bytes_and_show_leaks() -> None:
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(echo)
        network = server.network
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"12345")
            await stream.send_eof()
            assert await read_all(stream) == b"12345"
        await eventually(lambda: network.open_streams() == 0)
        stats = network.stats(client.peer_id)
        assert (stats.streams_opened, stats.bytes_sent, stats.bytes_received) == (1, 5, 5)
        assert network.stats(server.peer_id).streams_accepted == 1
        assert stats.connections_dialed == 1
        leaked = await client.open_stream(server.address)
        assert network.open_streams() == 2  # our end and the handler's end
        await leaked.aclose()
        await eventually(lambda: network.open_streams() == 0)


async def test_incoming_stream_limit_makes_openers_wait() -> None:
    async def until_reset(stream: Stream) -> None:
        with pytest.raises(PeerGone):
            await stream.receive()

    config = TransportConfig(max_incoming_streams=2)
    async with memory_endpoints(2, config=config) as (server, client):
        server.set_stream_handler(until_reset)
        first = await client.open_stream(server.address)
        second = await client.open_stream(server.address)
        with anyio.move_on_after(0.1) as scope:
            await client.open_stream(server.address)
        assert scope.cancelled_caught
        async with anyio.create_task_group() as tg:

            async def close_first_later() -> None:
                await anyio.sleep(0.05)
                await first.aclose()  # its handler sees the reset and frees the slot

            tg.start_soon(close_first_later)
            with anyio.fail_after(1):
                third = await client.open_stream(server.address)
        for stream in (second, third):
            await stream.aclose()


async def test_closed_stream_and_send_after_eof_raise_closed_resource() -> None:
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(silent)
        stream = await client.open_stream(server.address)
        await stream.send_eof()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"late")
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()


async def test_handler_exception_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(stream: Stream) -> None:
        raise ValueError("bug in handler")

    caplog.set_level(logging.ERROR, logger="distllm.transport")
    async with memory_endpoints(2, config=CONFIG) as (server, client):
        server.set_stream_handler(broken)
        async with await client.open_stream(server.address) as stream:
            with pytest.raises(PeerGone):
                await stream.receive()
    assert any("bug in handler" in (r.exc_text or "") for r in caplog.records)


async def test_one_running_endpoint_per_identity() -> None:
    network = MemoryNetwork()
    async with network.endpoint(identity_for(0)):
        with pytest.raises(ValueError, match="already has a running endpoint"):
            async with network.endpoint(identity_for(0)):
                pass


@given(
    chunks=st.lists(st.binary(min_size=0, max_size=300), max_size=30),
    read_sizes=st.lists(st.integers(1, 200), min_size=1, max_size=10),
    latency=st.sampled_from([0.0, 0.001, 0.05]),
)
@settings(max_examples=60, deadline=None)
def test_bytes_arrive_in_order_whatever_the_chunking(
    chunks: list[bytes], read_sizes: list[int], latency: float
) -> None:
    """Property: writes of any sizes, through a small window, reads of any sizes, any latency."""
    config = TransportConfig(stream_send_window=65536)

    async def scenario() -> bytes:
        async with memory_endpoints(2, config=config) as (server, client):
            server.set_stream_handler(echo)
            server.network.set_latency(latency)
            got = bytearray()
            async with await client.open_stream(server.address) as stream:
                for chunk in chunks:
                    await stream.send(chunk)
                await stream.send_eof()
                for i in itertools.count():
                    try:
                        got += await stream.receive(read_sizes[i % len(read_sizes)])
                    except anyio.EndOfStream:
                        return bytes(got)
        raise AssertionError("unreachable")

    clock = MockClock(autojump_threshold=0)
    assert anyio.run(scenario, backend="trio", backend_options={"clock": clock}) == b"".join(chunks)
