"""One QUIC connection: handshake, identity, the streams on it, and aioquic's events.

Life of a connection::

    HANDSHAKE --(TLS done; dialer: certificate key pinned, proof sent)--> READY
    HANDSHAKE --(TLS done; acceptor)--> AUTHENTICATING --(client proof verified)--> READY
    any state --(close / peer close / failure)--> CLOSED

Streams the peer opens before its proof is verified are held, not dispatched. Nothing here
awaits: the endpoint's driver feeds datagrams and timers in, and calls :meth:`handle_events`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode, QuicFrameType

from distllm.config import TransportConfig
from distllm.errors import (
    ConnectError,
    PeerGone,
    PeerIdentityMismatch,
    RemoteProtocolError,
    TransportError,
)
from distllm.identity import Identity
from distllm.ids import PeerID
from distllm.transport.quic_auth import PROOF_SIZE, encode_proof, verify_proof
from distllm.transport.quic_core import CoreConnection
from distllm.transport.quic_stream import QuicByteStream, StreamCode
from distllm.transport.tls import verify_peer_certificate

if TYPE_CHECKING:
    from distllm.transport.quic_driver import Driver

__all__ = ["CloseCode", "Connection", "ConnectionOwner", "State", "renew"]

#: TLS alert bad_certificate (42) as a QUIC CRYPTO_ERROR (RFC 9001 section 4.8).
_BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + 42
#: Up to this many open streams, application writes are flushed at once (see flush_soon).
_INLINE_FLUSH_STREAMS = 4
#: The dialer's proof travels on its first unidirectional stream.
_PROOF_STREAM_ID = 2


class CloseCode(enum.IntEnum):
    """Application error codes of CONNECTION_CLOSE."""

    #: Shutdown, disconnect, idle or dead peer: nothing went wrong on the wire.
    NO_ERROR = 0x0
    #: The dialer's identity proof was malformed or did not verify.
    AUTH_FAILED = 0x10
    #: No identity proof arrived within ``connect_timeout``.
    AUTH_TIMEOUT = 0x11


class State(enum.Enum):
    HANDSHAKE = "handshake"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


class ConnectionOwner(Protocol):
    """What a connection needs from its endpoint (datagrams go through the endpoint's driver)."""

    identity: Identity
    config: TransportConfig

    def connection_ready(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...
    def dispatch(self, stream: QuicByteStream) -> None: ...


class Connection:
    """Our state of one QUIC connection (either role)."""

    def __init__(
        self,
        owner: ConnectionOwner,
        driver: Driver,
        quic: CoreConnection,
        addr: tuple[Any, ...],
        now: float,
        *,
        expected_peer: PeerID | None,
    ) -> None:
        self.owner = owner
        self.driver = driver
        self.quic = quic
        self.addr = addr
        #: We dialed (QUIC client) iff we know whom to expect.
        self.is_client = expected_peer is not None
        self.expected_peer = expected_peer
        #: The verified identity of the other side (None until verified).
        self.remote_peer: PeerID | None = None
        self.state = State.HANDSHAKE
        #: Why the connection closed (set with state CLOSED).
        self.error: TransportError | None = None
        #: Set once READY or CLOSED.
        self.settled = anyio.Event()
        #: Streams that still expect events; their count is bounded by the stream limits.
        self.streams: dict[int, QuicByteStream] = {}
        self.incoming = 0  # how many of self.streams the peer opened
        self.send_blocked: set[QuicByteStream] = set()
        self.cids: set[bytes] = set()
        self.created_at = self.last_heard = self.last_ping = self.idle_since = now
        #: aioquic's next timer, refreshed after every flush.
        self.timer_at: float | None = None
        #: Datagrams received since we last let an ACK go out.
        self.unacked_datagrams = 0
        #: Counts flushes, so the driver can tell whether someone flushed after a batch.
        self.flushes = 0
        self._held: list[QuicByteStream] = []  # opened before the dialer's proof verified
        self._held_bytes = 0
        self._pin_checked = not self.is_client
        self._proof = bytearray()
        self._proof_complete = False
        # peer-initiated bidirectional stream ids already seen: all below the floor, plus a set
        self._seen_floor = 1 if self.is_client else 0
        self._seen: set[int] = set()

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        peer = self.remote_peer or self.expected_peer
        role = "to" if self.is_client else "from"
        return f"<Connection {role} {peer!r} {self.state.value}>"

    # -- input ---------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        self.last_heard = now
        self.unacked_datagrams += 1
        self.quic.receive_datagram(data, addr, now)
        if not self._pin_checked:
            self._check_pin()

    def handle_events(self, now: float) -> None:
        """Apply aioquic's pending events; then notice a close aioquic has not reported yet."""
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
                elif self._is_new_incoming(event.stream_id):
                    # opened and reset before any data: nothing to deliver; end our side too
                    quic.reset_sending(event.stream_id, StreamCode.CANCELLED)
            elif isinstance(event, events.StopSendingReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake_completed(now)
            elif isinstance(event, events.ConnectionIdIssued):
                self.cids.add(event.connection_id)
                self.driver.add_route(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                self.driver.remove_route(event.connection_id, self)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)
        if self.state is not State.CLOSED:
            termination = quic.termination()
            if termination is not None:
                self._on_terminated(termination)

    def wake_senders(self) -> None:
        for stream in list(self.send_blocked):
            stream._wake_sender_if_room()

    # -- output --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send what aioquic has for this connection now."""
        self.driver.flush(self)

    def flush_soon(self) -> None:
        """After an application write: send now while few streams are open (lowest latency);
        with many, once the tasks that are ready now have run, so that their writes share
        packets (aioquic's cost per packet grows with the number of open streams)."""
        if len(self.streams) <= _INLINE_FLUSH_STREAMS:
            self.driver.flush(self)
        else:
            self.driver.schedule_flush(self)

    def open_stream(self) -> QuicByteStream:
        if self.state is not State.READY:
            raise renew(self.error or ConnectError("connection is not established"))
        quic = self.quic
        stream_id = quic.get_next_available_stream_id()
        return self._new_stream(stream_id, quic.stream_for_send(stream_id), incoming=False)

    def close(
        self,
        error: TransportError,
        code: int = CloseCode.NO_ERROR,
        reason: str = "",
        *,
        frame_type: int | None = None,
    ) -> None:
        """Close now: send CONNECTION_CLOSE, fail every stream with ``error``."""
        if self.state is State.CLOSED:
            return
        self.quic.close(error_code=code, frame_type=frame_type, reason_phrase=reason)
        self.flush()
        self._fail(error)

    def forget(self, stream: QuicByteStream) -> None:
        """``stream`` expects no more events (finished both ways, reset or closed)."""
        if self.streams.pop(stream.stream_id, None) is not None:
            if stream.incoming:
                self.incoming -= 1
            if not self.streams:
                self.idle_since = anyio.current_time()
        self.send_blocked.discard(stream)

    # -- handshake and identity ----------------------------------------------------------------

    def _check_pin(self) -> None:
        """Dialer: compare the server's certificate key with the dialed PeerID as soon as the
        certificate arrives, before our Finished leaves; a mismatch aborts the handshake."""
        certificate = self.quic.peer_certificate()
        if certificate is None:
            return
        self._pin_checked = True
        assert self.expected_peer is not None
        try:
            verify_peer_certificate(certificate, self.expected_peer)
        except PeerIdentityMismatch as exc:
            self.close(
                exc, _BAD_CERTIFICATE, "peer identity mismatch", frame_type=QuicFrameType.CRYPTO
            )

    def _on_handshake_completed(self, now: float) -> None:
        if self.state is not State.HANDSHAKE:
            return
        if not self.is_client:
            self.state = State.AUTHENTICATING
            self._try_authenticate(now)
            return
        self._check_pin()
        if self.closed:
            return
        if not self._pin_checked:  # cannot happen: TLS 1.3 servers always send a certificate
            self.close(ConnectError("server presented no certificate"), _BAD_CERTIFICATE)
            return
        assert self.expected_peer is not None
        quic = self.quic
        proof = encode_proof(
            self.owner.identity,
            self.expected_peer,
            quic.original_destination_connection_id,
            quic.server_initial_cid() or b"",
        )
        quic.send_stream_data(quic.get_next_available_stream_id(True), proof, end_stream=True)
        self.remote_peer = self.expected_peer
        self._become_ready(now)

    def _on_proof_data(self, data: bytes, fin: bool, now: float) -> None:
        if self._proof_complete:
            return
        self._proof += data
        if len(self._proof) > PROOF_SIZE:
            self._reject(f"identity proof longer than {PROOF_SIZE} bytes")
            return
        if fin:
            self._proof_complete = True
            self._try_authenticate(now)

    def _try_authenticate(self, now: float) -> None:
        if self.state is not State.AUTHENTICATING or not self._proof_complete:
            return
        quic = self.quic
        try:
            peer = verify_proof(
                bytes(self._proof),
                self.owner.identity.peer_id,
                quic.original_destination_connection_id,
                quic.server_initial_cid() or b"",
            )
        except RemoteProtocolError as exc:
            self._reject(str(exc))
            return
        self.remote_peer = peer
        self._become_ready(now)

    def _reject(self, why: str) -> None:
        self.close(PeerGone(f"dialer rejected: {why}"), CloseCode.AUTH_FAILED, "proof rejected")

    def _become_ready(self, now: float) -> None:
        self.state = State.READY
        self.idle_since = self.last_heard = self.last_ping = now
        self.owner.connection_ready(self)
        self.settled.set()
        held, self._held = self._held, []
        for stream in held:
            if not stream._closed:
                self.owner.dispatch(stream)

    # -- streams -------------------------------------------------------------------------------

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        stream = self.streams.get(stream_id)
        if self.state is not State.READY and not stream_id & 2:
            # before its proof, a dialer gets one window of credit in all, not one per stream
            self._held_bytes += len(event.data)
            if self._held_bytes > self.owner.config.stream_receive_window:
                self._reject("too much stream data before the identity proof")
                return
        if stream is not None:
            stream._on_data(event.data, event.end_stream)
        elif stream_id & 2:  # unidirectional: only the dialer's proof is expected
            if not self.is_client and stream_id == _PROOF_STREAM_ID:
                self._on_proof_data(event.data, event.end_stream, anyio.current_time())
        elif self._is_new_incoming(stream_id):
            stream = self._accept_stream(stream_id)
            if stream is not None:
                stream._on_data(event.data, event.end_stream)

    def _is_new_incoming(self, stream_id: int) -> bool:
        """True the first time a peer-initiated bidirectional stream shows up."""
        if (stream_id & 1) != self._seen_floor & 1 or stream_id < self._seen_floor:
            return False
        if stream_id in self._seen:
            return False
        seen = self._seen
        seen.add(stream_id)
        while self._seen_floor in seen:
            seen.remove(self._seen_floor)
            self._seen_floor += 4
        return True

    def _accept_stream(self, stream_id: int) -> QuicByteStream | None:
        quic = self.quic
        core = quic.stream_state(stream_id)
        if core is None or self.incoming >= self.owner.config.max_incoming_streams:
            quic.reset_sending(stream_id, StreamCode.REFUSED)
            quic.stop_receiving(stream_id, StreamCode.REFUSED)
            return None
        stream = self._new_stream(stream_id, core, incoming=True)
        if self.state is State.READY:
            self.owner.dispatch(stream)
        else:
            self._held.append(stream)
        return stream

    def _new_stream(self, stream_id: int, core: object, *, incoming: bool) -> QuicByteStream:
        config = self.owner.config
        stream = QuicByteStream(
            self,
            stream_id,
            core,  # type: ignore[arg-type]
            incoming=incoming,
            send_window=config.stream_send_window,
            receive_window=config.stream_receive_window,
        )
        self.streams[stream_id] = stream
        if incoming:
            self.incoming += 1
        return stream

    # -- end -----------------------------------------------------------------------------------

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if self.state is State.CLOSED:
            return
        reason = event.reason_phrase or "no reason given"
        detail = f"{reason} (code 0x{event.error_code:x})"
        error: TransportError
        if self.state is State.HANDSHAKE:
            error = ConnectError(f"handshake failed: {detail}")
        else:
            error = PeerGone(f"connection to {self.remote_peer!r} closed: {detail}")
        self._fail(error)

    def _fail(self, error: TransportError) -> None:
        self.state = State.CLOSED
        self.error = error
        message = str(error)
        streams: Iterable[QuicByteStream] = list(self.streams.values()) + self._held
        self.streams.clear()
        self._held.clear()
        self.send_blocked.clear()
        self.incoming = 0
        for stream in streams:
            stream._on_connection_lost(message)
        self.settled.set()
        self.owner.connection_closed(self)


def renew(error: TransportError) -> TransportError:
    """A new exception equal to ``error``: each raise gets its own instance and traceback."""
    if isinstance(error, PeerIdentityMismatch):
        return PeerIdentityMismatch(error.expected, error.actual)
    if type(error) in (ConnectError, PeerGone, TransportError):
        return type(error)(str(error))
    return error
