"""QuicEndpoint under faults: a killed peer, junk datagrams, shutdown, idle and keep-alive."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest

from distllm.config import TransportConfig
from distllm.errors import PeerGone
from distllm.identity import Identity
from distllm.ids import PeerAddress
from distllm.transport.base import Stream
from distllm.transport.quic import QuicEndpoint

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
#: Slack on top of a timeout, for a real network stack on a busy 2-core machine.
MARGIN = 1.5
# Small datagrams on loopback too: faults meet many packets per transfer, as on the Internet.
CONFIG = TransportConfig(
    connect_timeout=2.0,
    keepalive_interval=0.2,
    dead_peer_timeout=1.0,
    loopback_datagram_size=1200,
)
SRC = str(Path(__file__).resolve().parents[2] / "src")

# A peer in another process: it answers b"first" on each stream, then holds it open.
CHILD = """
import anyio
from distllm.config import TransportConfig
from distllm.identity import Identity
from distllm.transport.quic import QuicEndpoint

async def hold(stream):
    await stream.send(b"first")
    await anyio.sleep_forever()

async def main():
    config = TransportConfig(keepalive_interval=0.2, dead_peer_timeout=1.0)
    async with QuicEndpoint(Identity.generate(), config=config) as endpoint:
        endpoint.set_stream_handler(hold)
        print(endpoint.address, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"quic-faults-%d" % n).digest())


async def read_line(process: anyio.abc.Process) -> str:
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        data += await process.stdout.receive()
    return data.decode().strip()


async def read_all(stream: Stream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


async def test_peer_killed_mid_stream_fails_pending_receive() -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    async with (
        QuicEndpoint(identity(0), config=CONFIG) as client,
        await anyio.open_process([sys.executable, "-c", CHILD], env=env) as child,
    ):
        try:
            with anyio.fail_after(30):  # the child imports distllm first
                peer = PeerAddress.parse(await read_line(child))
            async with await client.open_stream(peer) as stream:
                await stream.send(b"hello")
                with anyio.fail_after(10):
                    assert await stream.receive() == b"first"
                child.send_signal(signal.SIGKILL)
                start = anyio.current_time()
                with anyio.fail_after(CONFIG.dead_peer_timeout + MARGIN), pytest.raises(PeerGone):
                    await stream.receive()
                assert anyio.current_time() - start <= CONFIG.dead_peer_timeout + MARGIN
                with pytest.raises(PeerGone):
                    await stream.send(b"anyone?")
            assert not client.is_connected(peer.peer_id)
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            with anyio.move_on_after(5):
                await child.wait()


def junk_datagrams(rng: random.Random, live_cids: list[bytes]) -> list[bytes]:
    """Random bytes; fake Initials (long header, >= 1200 bytes); short headers naming live
    connection IDs with garbage inside; empty datagrams."""
    out = [os.urandom(rng.randrange(1, 1500)), b""]
    version = (1).to_bytes(4, "big")
    fake_initial = b"\xc0" + version + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8)
    out.append(fake_initial + b"\x00\x44\xb0" + os.urandom(1200))
    out.extend(b"\x40" + cid + os.urandom(rng.randrange(20, 1200)) for cid in live_cids)
    return out


async def test_junk_datagrams_do_not_disturb_a_transfer() -> None:
    data = os.urandom(8 * MiB)
    digests: list[bytes] = []

    async def sink(stream: Stream) -> None:
        digests.append(hashlib.sha256(await read_all(stream)).digest())
        await stream.send(b"done")
        await stream.send_eof()

    async with (
        QuicEndpoint(identity(1), config=CONFIG) as server,
        QuicEndpoint(identity(2), config=CONFIG) as client,
    ):
        server.set_stream_handler(sink)
        rng = random.Random(7)
        sent_junk = 0
        stop = anyio.Event()

        async def spray() -> None:
            nonlocal sent_junk
            targets = [server.address.socket_address, client.address.socket_address]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                while not stop.is_set():
                    cids = list(server._driver.routes) + list(client._driver.routes)  # type: ignore[union-attr]
                    for datagram in junk_datagrams(rng, cids):
                        for target in targets:
                            try:
                                sock.sendto(datagram, target)
                                sent_junk += 1
                            except BlockingIOError:
                                pass
                    await anyio.sleep(0.001)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(spray)
                async with await client.open_stream(server.address) as stream:
                    for pos in range(0, len(data), 64 * 1024):
                        await stream.send(data[pos : pos + 64 * 1024])
                    await stream.send_eof()
                    assert await read_all(stream) == b"done"
                stop.set()
        assert digests == [hashlib.sha256(data).digest()]
        assert sent_junk > 500
        assert len(server._driver.conns) == 1  # type: ignore[union-attr]  # no junk kept
        assert client.is_connected(server.peer_id)


async def test_leaving_the_endpoint_closes_connections_and_cancels_handlers() -> None:
    config = TransportConfig(connect_timeout=2.0, keepalive_interval=0.5, dead_peer_timeout=5.0)
    started, cancelled = anyio.Event(), anyio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with QuicEndpoint(identity(3), config=config) as client:
        server = QuicEndpoint(identity(4), config=config)
        async with server:
            server.set_stream_handler(handler)
            stream = await client.open_stream(server.address)
            await stream.send(b"x")
            with anyio.fail_after(10):
                await started.wait()
        assert cancelled.is_set()
        assert server._sock is not None and server._sock.fileno() == -1
        # CONNECTION_CLOSE arrives: far sooner than the dead-peer timeout
        with anyio.fail_after(1.0), pytest.raises(PeerGone, match="shutdown"):
            await stream.receive()
        assert not client.is_connected(server.peer_id)
        with pytest.raises(anyio.ClosedResourceError):
            await server.open_stream(client.address)


async def test_idle_connections_close_and_busy_ones_are_kept_alive() -> None:
    idle = TransportConfig(
        connect_timeout=2.0, keepalive_interval=0.1, dead_peer_timeout=0.5, idle_timeout=0.3
    )
    forever = TransportConfig(
        connect_timeout=2.0, keepalive_interval=0.1, dead_peer_timeout=0.5, idle_timeout=0
    )

    async def echo(stream: Stream) -> None:
        await stream.send(await read_all(stream))
        await stream.send_eof()

    for config, expect_connected in ((idle, False), (forever, True)):
        async with (
            QuicEndpoint(identity(5), config=config) as server,
            QuicEndpoint(identity(6), config=config) as client,
        ):
            server.set_stream_handler(echo)
            async with await client.open_stream(server.address) as stream:
                await stream.send(b"x")
                await stream.send_eof()
                with anyio.fail_after(10):
                    assert await read_all(stream) == b"x"
            # silent for twice the dead-peer timeout: only keep-alives cross
            await anyio.sleep(2 * config.dead_peer_timeout)
            assert client.is_connected(server.peer_id) is expect_connected
            assert server.is_connected(client.peer_id) is expect_connected


async def test_disconnect_fails_streams_then_redials() -> None:
    async def echo(stream: Stream) -> None:
        await stream.send(await read_all(stream))
        await stream.send_eof()

    async with (
        QuicEndpoint(identity(7), config=CONFIG) as server,
        QuicEndpoint(identity(8), config=CONFIG) as client,
    ):
        server.set_stream_handler(echo)
        stream = await client.open_stream(server.address)
        await stream.send(b"x")
        await client.disconnect(server.peer_id)
        with anyio.fail_after(1), pytest.raises(PeerGone):
            await stream.receive()
        assert not client.is_connected(server.peer_id)
        async with await client.open_stream(server.address) as again:
            await again.send(b"again")
            await again.send_eof()
            with anyio.fail_after(10):
                assert await read_all(again) == b"again"
