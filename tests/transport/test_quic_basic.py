"""QuicEndpoint: echo, identity on both sides, reuse of connections, handler errors, limits."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from distllm.config import TransportConfig
from distllm.errors import PeerGone
from distllm.identity import Identity
from distllm.transport.base import Endpoint, Stream
from distllm.transport.quic import QuicEndpoint, StreamCode, StreamReset
from distllm.transport.quic_socket import is_loopback

pytestmark = pytest.mark.anyio

CONFIG = TransportConfig(
    connect_timeout=2.0,
    keepalive_interval=0.2,
    dead_peer_timeout=1.0,
    stream_send_window=256 * 1024,
    stream_receive_window=256 * 1024,
)


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"quic-basic-%d" % n).digest())


@asynccontextmanager
async def endpoints(
    n: int, config: TransportConfig = CONFIG, host: str = "127.0.0.1"
) -> AsyncIterator[list[QuicEndpoint]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(QuicEndpoint(identity(i), host, 0, config))
            for i in range(n)
        ]


async def read_all(stream: Stream) -> bytes:
    chunks = []
    with anyio.fail_after(10):
        while True:
            try:
                chunks.append(await stream.receive())
            except anyio.EndOfStream:
                return b"".join(chunks)


async def echo(stream: Stream) -> None:
    await stream.send(await read_all(stream))
    await stream.send_eof()


async def test_echo_with_verified_identities_both_ways() -> None:
    seen: list[tuple[object, tuple[str, int]]] = []

    async def handler(stream: Stream) -> None:
        seen.append((stream.remote_peer, stream.remote_address))
        await echo(stream)

    async with endpoints(2) as (server, client):
        assert isinstance(server, Endpoint)
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as stream:
            assert stream.remote_peer == server.peer_id
            assert stream.remote_address == ("127.0.0.1", server.address.port)
            await stream.send(b"ping" * 1000)
            await stream.send_eof()
            assert await read_all(stream) == b"ping" * 1000
        assert seen == [(client.peer_id, ("127.0.0.1", client.address.port))]


async def test_ipv6_loopback() -> None:
    async with endpoints(2, host="::1") as (server, client):
        server.set_stream_handler(echo)
        assert str(server.address).endswith(f"@[::1]:{server.address.port}")
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"over v6")
            await stream.send_eof()
            assert await read_all(stream) == b"over v6"
            assert stream.remote_address == ("::1", server.address.port)


async def test_streams_share_one_connection_and_one_handshake() -> None:
    async with endpoints(2) as (server, client):
        server.set_stream_handler(echo)
        streams: list[Stream] = []

        async def open_one() -> None:
            streams.append(await client.open_stream(server.address))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(20):  # concurrent dials of one peer: one handshake
                    tg.start_soon(open_one)
        assert len(client._driver.conns) == 1  # type: ignore[union-attr]
        for i, stream in enumerate(streams):
            async with stream:
                await stream.send(b"%d" % i)
                await stream.send_eof()
                assert await read_all(stream) == b"%d" % i
        assert len(server._driver.conns) == 1  # type: ignore[union-attr]


async def test_the_acceptor_can_open_streams_back_on_the_same_connection() -> None:
    async with endpoints(2) as (a, b):
        a.set_stream_handler(echo)
        b.set_stream_handler(echo)
        async with await b.open_stream(a.address) as stream:  # b dials a
            await stream.send(b"hi")
            await stream.send_eof()
            assert await read_all(stream) == b"hi"
        assert a.is_connected(b.peer_id)
        async with await a.open_stream(b.address) as back:  # reuses the connection b made
            assert back.remote_peer == b.peer_id
            await back.send(b"back")
            await back.send_eof()
            assert await read_all(back) == b"back"
        assert len(a._driver.conns) == 1  # type: ignore[union-attr]


async def test_simultaneous_dials_both_work() -> None:
    async with endpoints(2) as (a, b):
        a.set_stream_handler(echo)
        b.set_stream_handler(echo)
        got: dict[str, bytes] = {}

        async def call(src: QuicEndpoint, dst: QuicEndpoint, name: str) -> None:
            async with await src.open_stream(dst.address) as stream:
                await stream.send(name.encode())
                await stream.send_eof()
                got[name] = await read_all(stream)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, a, b, "a->b")
                tg.start_soon(call, b, a, "b->a")
        assert got == {"a->b": b"a->b", "b->a": b"b->a"}
        assert a.is_connected(b.peer_id) and b.is_connected(a.peer_id)
        # later streams use whichever connection is in the pool
        async with await a.open_stream(b.address) as stream:
            await stream.send(b"again")
            await stream.send_eof()
            assert await read_all(stream) == b"again"


async def test_half_close_keeps_the_other_direction_open() -> None:
    async def handler(stream: Stream) -> None:
        request = await read_all(stream)
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()  # EOF is sticky
        for part in (request[::-1], b"!"):
            await stream.send(part)
        await stream.send_eof()

    async with endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"abc")
            await stream.send_eof()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.send(b"after eof")
            assert await read_all(stream) == b"cba!"


async def test_handler_exception_resets_its_stream_only() -> None:
    calls = 0

    async def handler(stream: Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stream.receive()
            raise RuntimeError("handler bug (expected in this test)")
        await echo(stream)

    async with endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        async with await client.open_stream(server.address) as first:
            await first.send(b"boom")
            with anyio.fail_after(10), pytest.raises(StreamReset) as info:
                await first.receive()
            assert info.value.error_code == StreamCode.HANDLER_ERROR
        async with await client.open_stream(server.address) as second:
            await second.send(b"still serving")
            await second.send_eof()
            assert await read_all(second) == b"still serving"


async def send_then_receive(stream: Stream, data: bytes) -> bytes:
    await stream.send(data)
    return await stream.receive()


async def test_no_handler_refuses_streams() -> None:
    async with endpoints(2) as (server, client), await client.open_stream(server.address) as s:
        with anyio.fail_after(10), pytest.raises(StreamReset) as info:
            await send_then_receive(s, b"anyone?")  # the send may already see the reset
        assert info.value.error_code == StreamCode.REFUSED


async def test_streams_beyond_the_incoming_limit_are_refused() -> None:
    config = TransportConfig(
        connect_timeout=2.0, keepalive_interval=0.2, dead_peer_timeout=1.0, max_incoming_streams=3
    )
    release = anyio.Event()

    async def handler(stream: Stream) -> None:
        await stream.receive()
        await release.wait()
        await stream.send(b"ok")
        await stream.send_eof()

    async with endpoints(2, config) as (server, client):
        server.set_stream_handler(handler)
        streams = [await client.open_stream(server.address) for _ in range(5)]
        for stream in streams:
            await stream.send(b"x")
        refused = 0
        with anyio.fail_after(10):
            for stream in streams[3:]:
                with pytest.raises(StreamReset) as info:
                    await stream.receive()
                assert info.value.error_code == StreamCode.REFUSED
                refused += 1
            release.set()
            for stream in streams[:3]:
                assert await read_all(stream) == b"ok"
        assert refused == 2
        for stream in streams:
            await stream.aclose()
        # closed streams free their slots
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"y")
            with anyio.fail_after(10):
                assert await read_all(stream) == b"ok"


async def test_reset_by_peer_is_peer_gone_and_aclose_is_idempotent() -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive()
        await stream.aclose()

    async with endpoints(2) as (server, client):
        server.set_stream_handler(handler)
        stream = await client.open_stream(server.address)
        await stream.send(b"x")
        with anyio.fail_after(10), pytest.raises(PeerGone, match="reset"):
            await stream.receive()
        await stream.aclose()
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"y")


async def test_endpoint_is_entered_once_and_address_needs_entering() -> None:
    endpoint = QuicEndpoint(identity(0), config=CONFIG)
    with pytest.raises(RuntimeError):
        _ = endpoint.address
    async with endpoint:
        assert endpoint.address.port > 0
    with pytest.raises(RuntimeError):
        async with endpoint:
            pass


@pytest.mark.parametrize(("loopback", "expected"), [(None, 16384), (1200, 1200), (9000, 9000)])
async def test_loopback_connections_use_the_loopback_datagram_size(
    loopback: int | None, expected: int
) -> None:
    config = (
        CONFIG if loopback is None else dataclasses.replace(CONFIG, loopback_datagram_size=loopback)
    )
    payload = os.urandom(256 * 1024)
    async with endpoints(2, config) as (server, client):
        server.set_stream_handler(echo)
        async with await client.open_stream(server.address) as stream:
            await stream.send(payload)
            await stream.send_eof()
            assert await read_all(stream) == payload
        for endpoint, peer in ((client, server.peer_id), (server, client.peer_id)):
            (conn,) = endpoint._pool[peer]
            assert conn.quic.configuration.max_datagram_size == expected


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
