"""The contract of distllm.transport.base, checked on every transport implementation."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from distllm.config import TransportConfig
from distllm.errors import ConnectError, PeerGone, PeerIdentityMismatch
from distllm.ids import PeerAddress
from distllm.testing import MemoryNetwork, identity_for
from distllm.transport.base import Endpoint, Stream

pytestmark = pytest.mark.anyio

CONFIG = TransportConfig(
    connect_timeout=2.0,
    keepalive_interval=0.2,
    dead_peer_timeout=1.0,
    stream_send_window=65536,
    stream_receive_window=65536,
)
#: Slack on top of a timeout for detection by a real network stack on a busy machine.
MARGIN = 1.5

EndpointsFactory = Callable[..., AbstractAsyncContextManager[list[Endpoint]]]


@pytest.fixture(params=["memory", "quic"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_endpoints(transport_kind: str) -> EndpointsFactory:
    """``make_endpoints(n, config=CONFIG)``: an async context manager of n entered endpoints."""
    if transport_kind == "memory":
        network = MemoryNetwork()

        def build(identity: Any, config: TransportConfig) -> AbstractAsyncContextManager[Any]:
            return network.endpoint(identity, config)

    else:
        quic = pytest.importorskip("distllm.transport.quic")

        def build(identity: Any, config: TransportConfig) -> AbstractAsyncContextManager[Any]:
            return quic.QuicEndpoint(identity, host="127.0.0.1", port=0, config=config)  # type: ignore[no-any-return]

    counter = iter(range(10**6))

    @asynccontextmanager
    async def endpoints(n: int, config: TransportConfig = CONFIG) -> AsyncIterator[list[Endpoint]]:
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(build(identity_for(next(counter)), config))
                for _ in range(n)
            ]

    return endpoints


async def read_all(stream: Stream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


async def echo_handler(stream: Stream) -> None:
    data = await read_all(stream)
    await stream.send(data)
    await stream.send_eof()


async def send_then_receive(stream: Stream, data: bytes) -> bytes:
    await stream.send(data)
    return await stream.receive()


def payload(seed: int, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(b"%d" % seed).digest()
    while len(out) < size:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])


async def test_echo_and_mutual_identity(make_endpoints: EndpointsFactory) -> None:
    seen = []

    async def handler(stream: Stream) -> None:
        seen.append(stream.remote_peer)
        await echo_handler(stream)

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        data = payload(1, 200_000)
        stream = await client.open_stream(server.address)
        async with stream:
            assert stream.remote_peer == server.peer_id
            await stream.send(data)
            await stream.send_eof()
            with anyio.fail_after(10):
                assert await read_all(stream) == data
        assert seen == [client.peer_id]
        assert client.is_connected(server.peer_id)


async def test_many_concurrent_streams(make_endpoints: EndpointsFactory) -> None:
    async with make_endpoints(3) as (server, a, b):
        server.set_stream_handler(echo_handler)
        results: dict[tuple[int, int], bytes] = {}

        async def one(client: Endpoint, i: int) -> None:
            async with await client.open_stream(server.address) as stream:
                await stream.send(payload(i, 3000 + i))
                await stream.send_eof()
                results[(id(client), i)] = await read_all(stream)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, a, i)
                    tg.start_soon(one, b, i)
        assert len(results) == 80
        for (_, i), got in results.items():
            assert got == payload(i, 3000 + i)


async def test_half_close_then_end_of_stream(make_endpoints: EndpointsFactory) -> None:
    async def handler(stream: Stream) -> None:
        request = await read_all(stream)  # the client half-closed; we may still answer
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.send(request[::-1])
        await stream.send(b"!")
        await stream.send_eof()

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"abc")
            await stream.send_eof()
            with anyio.fail_after(10):
                assert await read_all(stream) == b"cba!"
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()


async def test_reset_by_server_fails_client_with_peer_gone(
    make_endpoints: EndpointsFactory,
) -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive()
        await stream.aclose()  # not finished in either direction: a reset

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"x")
            with anyio.fail_after(10), pytest.raises(PeerGone):
                await stream.receive()


async def test_reset_by_client_fails_server_with_peer_gone(
    make_endpoints: EndpointsFactory,
) -> None:
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def handler(stream: Stream) -> None:
        await stream.receive()
        try:
            with anyio.fail_after(10):
                await stream.receive()
        except PeerGone as exc:
            outcome.append(exc)
        finally:
            done.set()

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        stream = await client.open_stream(server.address)
        await stream.send(b"x")
        await anyio.sleep(0.05)
        await stream.aclose()
        await stream.aclose()  # idempotent
        with anyio.fail_after(10):
            await done.wait()
        assert len(outcome) == 1


async def test_handler_exception_resets_only_that_stream(
    make_endpoints: EndpointsFactory,
) -> None:
    calls = 0

    async def handler(stream: Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stream.receive()
            raise RuntimeError("handler bug")
        await echo_handler(stream)

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as first:
            await first.send(b"boom")
            with anyio.fail_after(10), pytest.raises(PeerGone):
                await first.receive()
        async with await client.open_stream(server.address) as second:
            await second.send(b"still alive")
            await second.send_eof()
            with anyio.fail_after(10):
                assert await read_all(second) == b"still alive"


async def test_stream_without_handler_is_reset(make_endpoints: EndpointsFactory) -> None:
    async with (
        make_endpoints(2) as (server, client),
        await client.open_stream(server.address) as stream,
    ):
        with anyio.fail_after(10), pytest.raises(PeerGone):
            await send_then_receive(stream, b"anyone?")  # the send may already see the reset


async def test_identity_mismatch(make_endpoints: EndpointsFactory) -> None:
    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(echo_handler)
        impostor = identity_for(999_999).peer_id
        wrong = PeerAddress(impostor, server.address.host, server.address.port)
        with anyio.fail_after(CONFIG.connect_timeout + MARGIN), pytest.raises(PeerIdentityMismatch):
            await client.open_stream(wrong)
        assert not client.is_connected(impostor)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_address_fails_within_connect_timeout(
    make_endpoints: EndpointsFactory, transport_kind: str
) -> None:
    async with make_endpoints(1) as (client,):
        host = "127.0.0.1" if transport_kind == "quic" else client.address.host
        nobody = PeerAddress(identity_for(424_242).peer_id, host, free_udp_port())
        start = anyio.current_time()
        with pytest.raises(ConnectError):
            with anyio.fail_after(CONFIG.connect_timeout + MARGIN):
                await client.open_stream(nobody)
        assert anyio.current_time() - start <= CONFIG.connect_timeout + MARGIN


async def test_back_pressure_bounds_a_sender(make_endpoints: EndpointsFactory) -> None:
    chunk, total = 16384, 4 * 1024 * 1024
    start_reading = anyio.Event()
    all_received = anyio.Event()
    received = bytearray()

    async def handler(stream: Stream) -> None:
        await start_reading.wait()
        received.extend(await read_all(stream))
        all_received.set()

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        sent = 0
        data = payload(7, total)
        async with await client.open_stream(server.address) as stream:

            async def sender() -> None:
                nonlocal sent
                for pos in range(0, total, chunk):
                    await stream.send(data[pos : pos + chunk])
                    sent += chunk
                await stream.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                await anyio.sleep(0.5)
                # Both windows may fill (sender's unacknowledged + receiver's buffer), not more.
                bound = CONFIG.stream_send_window + CONFIG.stream_receive_window + chunk
                assert sent <= bound, f"sent {sent} bytes to a receiver that reads nothing"
                start_reading.set()
                with anyio.fail_after(30):
                    await all_received.wait()
        assert bytes(received) == data


async def test_cancelled_receive_loses_no_bytes(make_endpoints: EndpointsFactory) -> None:
    data = payload(3, 300 * 1024)

    async def handler(stream: Stream) -> None:
        for pos in range(0, len(data), 1024):
            await stream.send(data[pos : pos + 1024])
            if pos % 8192 == 0:
                await anyio.sleep(0.002)
        await stream.send_eof()

    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        got = bytearray()
        cancelled = 0
        async with await client.open_stream(server.address) as stream:
            await stream.send_eof()
            with anyio.fail_after(30):
                while True:
                    with anyio.move_on_after(0.001) as scope:
                        try:
                            got += await stream.receive()
                        except anyio.EndOfStream:
                            break
                    cancelled += scope.cancelled_caught
        assert bytes(got) == data
        assert cancelled > 0


async def test_leaving_endpoint_fails_peer_receive(make_endpoints: EndpointsFactory) -> None:
    handler_started = anyio.Event()
    stop_server = anyio.Event()

    async def handler(stream: Stream) -> None:
        handler_started.set()
        await anyio.sleep_forever()

    async def run_server(*, task_status: anyio.abc.TaskStatus[Endpoint]) -> None:
        async with make_endpoints(1) as (server,):
            server.set_stream_handler(handler)
            task_status.started(server)
            await stop_server.wait()

    async with make_endpoints(1) as (client,), anyio.create_task_group() as tg:
        server = await tg.start(run_server)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"hello")
            with anyio.fail_after(10):
                await handler_started.wait()
            await anyio.sleep(0.05)
            stop_server.set()
            start = anyio.current_time()
            with anyio.fail_after(CONFIG.dead_peer_timeout + MARGIN), pytest.raises(PeerGone):
                await stream.receive()
            assert anyio.current_time() - start <= CONFIG.dead_peer_timeout + MARGIN
            with pytest.raises(PeerGone):
                await stream.send(b"more")
        assert not client.is_connected(server.peer_id)


async def test_disconnect_fails_streams_and_redials(make_endpoints: EndpointsFactory) -> None:
    async with make_endpoints(2) as (server, client):
        server.set_stream_handler(echo_handler)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"x")
            await client.disconnect(server.peer_id)
            with anyio.fail_after(10), pytest.raises(PeerGone):
                await stream.receive()
        assert not client.is_connected(server.peer_id)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"again")
            await stream.send_eof()
            with anyio.fail_after(10):
                assert await read_all(stream) == b"again"
