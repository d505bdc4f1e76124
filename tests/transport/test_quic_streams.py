"""QuicEndpoint streams: many at once, big transfers, back-pressure, cancellation."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from distllm.config import TransportConfig
from distllm.identity import Identity
from distllm.transport.base import Stream
from distllm.transport.quic import QuicEndpoint
from distllm.transport.quic_stream import QuicByteStream

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CONFIG = TransportConfig(connect_timeout=2.0, keepalive_interval=0.2, dead_peer_timeout=1.0)


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"quic-streams-%d" % n).digest())


@asynccontextmanager
async def pair(config: TransportConfig = CONFIG) -> AsyncIterator[list[QuicEndpoint]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(QuicEndpoint(identity(i), config=config))
            for i in range(2)
        ]


async def read_all(stream: Stream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha512(b"%d" % seed).digest() * 64  # 4 KiB, not all-equal bytes
    return (block * (size // len(block) + 1))[:size]


async def test_thousand_concurrent_streams_on_one_connection() -> None:
    n = 1000
    all_open = anyio.Event()
    opened = 0

    async def echo(stream: Stream) -> None:
        await stream.send(await read_all(stream))
        await stream.send_eof()

    async with pair() as (server, client):
        server.set_stream_handler(echo)
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            nonlocal opened
            async with await client.open_stream(server.address) as stream:
                await stream.send(b"request %d " % i * 8)
                opened += 1
                if opened == n:
                    all_open.set()
                await all_open.wait()  # every stream is open at this point
                await stream.send_eof()
                results[i] = await read_all(stream)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        assert results == {i: b"request %d " % i * 8 for i in range(n)}
        assert len(client._driver.conns) == 1  # type: ignore[union-attr]


async def transfer(size: int, config: TransportConfig, chunk: int = 256 * 1024) -> None:
    data = payload(size)
    digests: list[bytes] = []

    async def sink(stream: Stream) -> None:
        digest = hashlib.sha256()
        received = 0
        while True:
            try:
                piece = await stream.receive()
            except anyio.EndOfStream:
                break
            digest.update(piece)
            received += len(piece)
        digests.append(digest.digest())
        await stream.send(received.to_bytes(8, "big"))
        await stream.send_eof()

    async with pair(config) as (server, client):
        server.set_stream_handler(sink)
        async with await client.open_stream(server.address) as stream:
            with anyio.fail_after(60):
                for pos in range(0, size, chunk):
                    await stream.send(data[pos : pos + chunk])
                await stream.send_eof()
                assert int.from_bytes(await read_all(stream), "big") == size
    assert digests == [hashlib.sha256(data).digest()]


async def test_8_mib_transfer() -> None:
    await transfer(8 * MiB, CONFIG)


async def test_8_mib_transfer_large_datagrams_and_one_big_send() -> None:
    config = TransportConfig(
        connect_timeout=2.0,
        keepalive_interval=0.2,
        dead_peer_timeout=1.0,
        max_datagram_size=16384,
        stream_send_window=MiB,
    )
    await transfer(8 * MiB, config, chunk=8 * MiB)  # one send, larger than the window


class FlakySocket:
    """A UDP socket whose send buffer is 'full' (BlockingIOError) every few datagrams."""

    def __init__(self, sock: socket.socket, every: int) -> None:
        self._sock = sock
        self._every = every
        self.sends = 0
        self.refused = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def family(self) -> int:
        return self._sock.family

    def recvfrom_into(self, buffer: memoryview) -> tuple[int, Any]:
        return self._sock.recvfrom_into(buffer)

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sends += 1
        if self.sends % self._every == 0:
            self.refused += 1
            raise BlockingIOError
        return self._sock.sendto(data, addr)


async def test_datagrams_that_find_the_socket_full_are_sent_later() -> None:
    data = payload(4 * MiB, seed=3)
    config = TransportConfig(
        connect_timeout=2.0, keepalive_interval=0.2, dead_peer_timeout=2.0, max_datagram_size=16384
    )

    async def echo(stream: Stream) -> None:
        await stream.send(await read_all(stream))
        await stream.send_eof()

    async with pair(config) as (server, client):
        server.set_stream_handler(echo)
        flaky = []
        for endpoint in (server, client):
            assert endpoint._driver is not None
            flaky.append(FlakySocket(endpoint._driver.sock, every=7))
            endpoint._driver.sock = flaky[-1]  # type: ignore[assignment]
        async with await client.open_stream(server.address) as stream:
            with anyio.fail_after(30):
                await stream.send(data)
                await stream.send_eof()
                assert await read_all(stream) == data
        assert all(sock.refused > 10 for sock in flaky)


async def test_transfer_with_pacing() -> None:
    config = TransportConfig(
        connect_timeout=2.0, keepalive_interval=0.2, dead_peer_timeout=2.0, pacing=True
    )
    await transfer(2 * MiB, config)


@pytest.mark.slow
async def test_64_mib_transfer() -> None:
    await transfer(64 * MiB, CONFIG)


async def test_back_pressure_bounds_sender_and_receiver_buffers() -> None:
    window = 256 * 1024
    config = TransportConfig(
        connect_timeout=2.0,
        keepalive_interval=0.2,
        dead_peer_timeout=1.0,
        stream_send_window=window,
        stream_receive_window=window,
    )
    total, chunk = 8 * MiB, 64 * 1024
    data = payload(total, seed=1)
    start_reading = anyio.Event()
    accepted: list[QuicByteStream] = []
    received = bytearray()
    all_received = anyio.Event()

    async def slow_reader(stream: Stream) -> None:
        assert isinstance(stream, QuicByteStream)
        accepted.append(stream)
        await start_reading.wait()
        received.extend(await read_all(stream))
        all_received.set()

    async with pair(config) as (server, client):
        server.set_stream_handler(slow_reader)
        sent = 0
        stream = await client.open_stream(server.address)
        assert isinstance(stream, QuicByteStream)

        async def sender() -> None:
            nonlocal sent
            for pos in range(0, total, chunk):
                await stream.send(data[pos : pos + chunk])
                sent += chunk
            await stream.send_eof()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                await anyio.sleep(0.5)  # plenty of time to push megabytes if nothing held it
                assert sent < total  # send is blocked
                assert sent <= 2 * window + chunk, sent
                (far_end,) = accepted
                assert 0 < far_end._buffered <= window  # the receiver buffered about a window
                assert stream._core.max_stream_data_remote <= window  # no credit beyond it
                start_reading.set()
            with anyio.fail_after(10):
                await all_received.wait()
        await stream.aclose()
    assert bytes(received) == data


async def test_cancelled_receive_loses_no_bytes() -> None:
    data = payload(512 * 1024, seed=2)

    async def trickle(stream: Stream) -> None:
        for pos in range(0, len(data), 1000):
            await stream.send(data[pos : pos + 1000])
            if pos % 16000 == 0:
                await anyio.sleep(0.001)
        await stream.send_eof()

    async with pair() as (server, client):
        server.set_stream_handler(trickle)
        got = bytearray()
        cancelled = 0
        async with await client.open_stream(server.address) as stream:
            await stream.send_eof()  # opens the stream at the server
            with anyio.fail_after(30):
                while True:
                    with anyio.move_on_after(0.0005) as scope:
                        try:
                            got += await stream.receive(3000)
                        except anyio.EndOfStream:
                            break
                    cancelled += scope.cancelled_caught
    assert bytes(got) == data
    assert cancelled > 0


async def test_concurrent_receives_on_one_stream_are_refused() -> None:
    async def silent(stream: Stream) -> None:
        await anyio.sleep(5)

    async with pair() as (server, client):
        server.set_stream_handler(silent)
        async with await client.open_stream(server.address) as stream:
            await stream.send(b"x")
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream.receive)
                    await anyio.sleep(0.05)
                    with pytest.raises(anyio.BusyResourceError):
                        await stream.receive()
                    tg.cancel_scope.cancel()
