"""Peer identity over QUIC: pinned server certificates and the dialer's signed proof."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from distllm.config import TransportConfig
from distllm.errors import ConnectError, PeerGone, PeerIdentityMismatch, RemoteProtocolError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.transport import quic_conn
from distllm.transport.base import Stream
from distllm.transport.quic import QuicEndpoint
from distllm.transport.quic_auth import PROOF_SIZE, encode_proof, proof_message, verify_proof
from distllm.transport.tls import certificate_peer_id, make_certificate, verify_peer_certificate

CONFIG = TransportConfig(connect_timeout=2.0, keepalive_interval=0.2, dead_peer_timeout=1.0)
MARGIN = 1.5


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"quic-identity-%d" % n).digest())


@asynccontextmanager
async def pair() -> AsyncIterator[list[QuicEndpoint]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(QuicEndpoint(identity(i), config=CONFIG))
            for i in range(2)
        ]


# -- certificates ------------------------------------------------------------------------------


def test_certificate_carries_the_identity_key() -> None:
    me = identity(1)
    certificate = make_certificate(me)
    assert certificate_peer_id(certificate) == me.peer_id
    assert verify_peer_certificate(certificate, me.peer_id) == me.peer_id
    with pytest.raises(PeerIdentityMismatch) as info:
        verify_peer_certificate(certificate, identity(2).peer_id)
    assert info.value.actual == me.peer_id


def test_certificates_are_fresh_per_call() -> None:
    me = identity(1)
    assert make_certificate(me).serial_number != make_certificate(me).serial_number


# -- the dialer's proof ------------------------------------------------------------------------


def test_proof_verifies_only_for_its_server_and_connection() -> None:
    client, server, other = identity(1), identity(2), identity(3)
    odcid, scid = b"\x01" * 8, b"\x02" * 8
    proof = encode_proof(client, server.peer_id, odcid, scid)
    assert len(proof) == PROOF_SIZE
    assert verify_proof(proof, server.peer_id, odcid, scid) == client.peer_id
    with pytest.raises(RemoteProtocolError):  # relayed to another server
        verify_proof(proof, other.peer_id, odcid, scid)
    with pytest.raises(RemoteProtocolError):  # replayed on another connection
        verify_proof(proof, server.peer_id, odcid, b"\x03" * 8)
    with pytest.raises(RemoteProtocolError):
        verify_proof(proof, server.peer_id, b"\x04" * 8, scid)


def test_malformed_proofs_are_remote_protocol_errors() -> None:
    client, server = identity(1), identity(2)
    proof = encode_proof(client, server.peer_id, b"a", b"b")
    for bad in (
        b"",
        proof[:-1],
        proof + b"x",
        b"\x02" + proof[1:],
        proof[:40] + b"\0" + proof[41:],
    ):
        with pytest.raises(RemoteProtocolError):
            verify_proof(bad, server.peer_id, b"a", b"b")


def test_proof_message_layout() -> None:
    server, client = PeerID(b"\x11" * 32), PeerID(b"\x22" * 32)
    message = proof_message(server, client, b"\xaa" * 8, b"\xbb" * 4)
    assert message == (
        b"distllm/1 quic client proof\x00"
        + b"\x11" * 32
        + b"\x22" * 32
        + b"\x08"
        + b"\xaa" * 8
        + b"\x04"
        + b"\xbb" * 4
    )


# -- over the wire -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_dialing_a_wrong_peer_id_fails_before_any_stream() -> None:
    reached: list[Stream] = []

    async def handler(stream: Stream) -> None:
        reached.append(stream)

    async with pair() as (server, client):
        server.set_stream_handler(handler)
        impostor = identity(99).peer_id
        wrong = PeerAddress(impostor, server.address.host, server.address.port)
        with anyio.fail_after(CONFIG.connect_timeout + MARGIN):
            with pytest.raises(PeerIdentityMismatch) as info:
                await client.open_stream(wrong)
            # concurrent and repeated dials get the same verdict
            with pytest.raises(PeerIdentityMismatch):
                await client.open_stream(wrong)
        assert info.value.expected == impostor
        assert info.value.actual == server.peer_id
        assert not client.is_connected(impostor)
        assert not client.is_connected(server.peer_id)
        await anyio.sleep(0.1)
        assert reached == []
        assert not server._driver.conns  # type: ignore[union-attr]  # the server dropped it too


@pytest.mark.anyio
async def test_dialer_with_a_bad_proof_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dialer that cannot sign for the key it presents never reaches a handler."""
    liar = identity(50)

    def forged(me: Identity, server: PeerID, odcid: bytes, scid: bytes) -> bytes:
        genuine = encode_proof(me, server, odcid, scid)
        return genuine[:1] + liar.public_key_bytes + genuine[33:]  # liar's key, my signature

    monkeypatch.setattr(quic_conn, "encode_proof", forged)  # test hook: the proof sent
    reached: list[Stream] = []

    async def handler(stream: Stream) -> None:
        reached.append(stream)

    async with pair() as (server, client):
        server.set_stream_handler(handler)
        stream = await client.open_stream(server.address)
        await stream.send(b"let me in")
        with anyio.fail_after(CONFIG.connect_timeout + MARGIN), pytest.raises(PeerGone):
            await stream.receive()
        assert reached == []
        assert not server.is_connected(liar.peer_id)
        assert not server.is_connected(client.peer_id)


@pytest.mark.anyio
async def test_empty_proof_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic_conn, "encode_proof", lambda *a: b"")  # the proof stream: a FIN
    async with pair() as (server, client):
        server.set_stream_handler(lambda stream: anyio.lowlevel.checkpoint())
        stream = await client.open_stream(server.address)
        await stream.send(b"x")
        with anyio.fail_after(CONFIG.connect_timeout + MARGIN), pytest.raises(PeerGone):
            await stream.receive()
        assert not server._driver.conns  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_dialer_that_sends_no_proof_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TransportConfig(connect_timeout=0.5, keepalive_interval=0.1, dead_peer_timeout=2.0)
    # test hook: the acceptor waits for the proof on a stream the dialer never opens
    monkeypatch.setattr(quic_conn, "_PROOF_STREAM_ID", 6)
    async with (
        QuicEndpoint(identity(0), config=config) as server,
        QuicEndpoint(identity(1), config=config) as client,
    ):
        server.set_stream_handler(lambda stream: anyio.lowlevel.checkpoint())
        stream = await client.open_stream(server.address)
        await stream.send(b"x")
        with anyio.fail_after(config.connect_timeout + MARGIN), pytest.raises(PeerGone):
            await stream.receive()
        assert not server._driver.conns  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_unproven_dialer_cannot_make_the_acceptor_buffer_much(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = 64 * 1024
    config = TransportConfig(
        connect_timeout=10.0,
        keepalive_interval=0.2,
        dead_peer_timeout=5.0,
        stream_send_window=window,
        stream_receive_window=window,
    )
    monkeypatch.setattr(quic_conn, "_PROOF_STREAM_ID", 6)  # the proof never verifies
    async with (
        QuicEndpoint(identity(0), config=config) as server,
        QuicEndpoint(identity(1), config=config) as client,
    ):
        server.set_stream_handler(lambda stream: anyio.lowlevel.checkpoint())
        streams = [await client.open_stream(server.address) for _ in range(4)]

        async def flood() -> None:
            for stream in streams:
                await stream.send(b"x" * window)  # one window per stream: 4 in all
            await streams[0].receive()

        with anyio.fail_after(3), pytest.raises(PeerGone):  # long before connect_timeout
            await flood()
        assert not server._driver.conns  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_nobody_listening_is_a_connect_error() -> None:
    config = TransportConfig(connect_timeout=1.0, keepalive_interval=0.2, dead_peer_timeout=1.0)
    async with QuicEndpoint(identity(0), config=config) as client:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        nobody = PeerAddress(identity(7).peer_id, "127.0.0.1", port)
        start = anyio.current_time()
        with anyio.fail_after(config.connect_timeout + MARGIN), pytest.raises(ConnectError):
            await client.open_stream(nobody)
        assert anyio.current_time() - start >= config.connect_timeout * 0.9
