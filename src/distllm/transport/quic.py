"""QUIC endpoint: one UDP socket, many authenticated connections, both roles, over anyio.

The endpoint drives aioquic's sans-IO :class:`~aioquic.quic.connection.QuicConnection` itself
(``aioquic.asyncio`` cannot run under trio); the socket loops live in
:mod:`distllm.transport.quic_driver`. This module owns the rest: creating connections (dialing,
and accepting valid Initial packets for unknown connection IDs), the pool of authenticated
connections by PeerID, keep-alives and dead/idle detection, and the tasks of stream handlers.
Identity checks: :mod:`distllm.transport.tls` (the dialer pins the server's certificate key) and
:mod:`distllm.transport.quic_auth` (the dialer's signed proof).
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported from _buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from distllm.config import TransportConfig
from distllm.errors import ConnectError, PeerGone, TransportError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.transport.base import Stream, StreamHandler
from distllm.transport.quic_conn import CloseCode, Connection, State, renew
from distllm.transport.quic_core import CoreConnection
from distllm.transport.quic_driver import Address, Driver
from distllm.transport.quic_socket import CID_LENGTH, is_loopback, open_udp_socket, resolve
from distllm.transport.quic_stream import QuicByteStream, StreamCode, StreamReset
from distllm.transport.tls import ALPN, make_certificate

__all__ = ["QuicEndpoint", "StreamCode", "StreamReset"]

_log = logging.getLogger("distllm.transport.quic")

#: Clients must pad Initial packets to 1200 bytes (RFC 9000 section 14.1); shorter is junk.
_MIN_INITIAL = 1200
#: Server-side connections still in the handshake or awaiting the proof; more Initials are
#: dropped (bounds the CPU and memory that junk or half-open handshakes can cost).
_MAX_PENDING = 64
#: New-connection attempts examined per second (token bucket); a junk Initial costs ~0.2 ms
#: of CPU to reject, a real handshake ~3 ms.
_ACCEPT_RATE = 200.0
_ACCEPT_BURST = 100.0
_MiB = 1024 * 1024


@dataclass(eq=False)
class _Dial:
    """One handshake in progress; every ``open_stream`` to that peer waits for it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    conn: Connection | None = None
    error: TransportError | None = None


class QuicEndpoint:
    """A distllm peer on one UDP port: dials and accepts QUIC connections, both authenticated.

    Implements :class:`distllm.transport.base.Endpoint`. Must be used as an async context
    manager; streams are :class:`~distllm.transport.quic_stream.QuicByteStream`.
    """

    def __init__(
        self,
        identity: Identity,
        host: str = "127.0.0.1",
        port: int = 0,
        config: TransportConfig = TransportConfig(),  # noqa: B008  (frozen, shared on purpose)
    ) -> None:
        self.identity = identity
        self.config = config
        self._host = host
        self._port = port
        certificate = make_certificate(identity)
        # Connections to and from loopback peers get datagrams of their own size (see
        # TransportConfig.loopback_datagram_size).
        loopback = max(config.max_datagram_size, config.loopback_datagram_size)
        self._client_config = self._quic_configuration(is_client=True)
        self._loopback_client_config = self._quic_configuration(
            is_client=True, datagram_size=loopback
        )
        self._server_config = self._quic_configuration(is_client=False)
        self._loopback_server_config = self._quic_configuration(
            is_client=False, datagram_size=loopback
        )
        for server in (self._server_config, self._loopback_server_config):
            server.certificate = certificate
            server.private_key = identity.private_key
        self._handler: StreamHandler | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._sock: socket.socket | None = None
        self._driver: Driver | None = None
        self._state = "new"
        self._pending = 0  # server-side connections not READY yet
        self._accept_tokens = _ACCEPT_BURST
        self._accept_time = 0.0
        # the pool: READY connections by verified peer; handshakes in progress by dialed peer
        self._pool: dict[PeerID, list[Connection]] = {}
        self._dials: dict[PeerID, _Dial] = {}
        self._ping_ids = itertools.count()

    def _quic_configuration(
        self, *, is_client: bool, datagram_size: int | None = None
    ) -> QuicConfiguration:
        config = self.config
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            connection_id_length=CID_LENGTH,
            # aioquic's own idle timer is a backstop behind our keep-alives and dead-peer check
            idle_timeout=max(config.idle_timeout, config.dead_peer_timeout) + 10.0,
            max_datagram_size=datagram_size or config.max_datagram_size,
            # connection-level credit doubles as used (aioquic); per-stream credit is ours
            max_data=max(16 * _MiB, 4 * config.stream_receive_window),
            max_stream_data=config.stream_receive_window,
            # no CA: the dialer checks the certificate key against the PeerID it dialed
            verify_mode=ssl.CERT_NONE,
        )

    # -- Endpoint API --------------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def address(self) -> PeerAddress:
        if self._state != "running":
            raise RuntimeError("the endpoint's address is known once it is entered")
        return PeerAddress(self.peer_id, self._host, self._port)

    def set_stream_handler(self, handler: StreamHandler | None) -> None:
        self._handler = handler

    async def open_stream(self, peer: PeerAddress) -> Stream:
        if self._state != "running":
            raise anyio.ClosedResourceError
        conn = self._pick(peer.peer_id)
        if conn is None:
            conn = await self._connect(peer)
        return conn.open_stream()

    async def disconnect(self, peer_id: PeerID) -> None:
        for conn in list(self._pool.get(peer_id, ())):
            conn.close(PeerGone(f"disconnected from {peer_id!r}"), reason="disconnect")
        await anyio.lowlevel.checkpoint()

    def is_connected(self, peer_id: PeerID) -> bool:
        return self._pick(peer_id) is not None

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a QuicEndpoint can be entered only once")
        self._sock = sock = await open_udp_socket(
            self._host, self._port, self.config.socket_buffer_bytes
        )
        self._port = sock.getsockname()[1]
        config = self.config
        driver = self._driver = Driver(
            sock,
            on_unknown=self._accept,
            on_tick=self._maintain,
            tick=min(config.keepalive_interval / 2, config.dead_peer_timeout / 4),
            datagram_size=config.max_datagram_size,
        )
        tg = self._tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(driver.run_receiver)
            await tg.start(driver.run_timers)
            await tg.start(driver.run_flusher)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            sock.close()
            raise
        self._state = "running"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None and self._sock is not None
        self._state = "closing"
        try:
            for conn in list(self._driver_or_fail().conns):
                conn.close(PeerGone("endpoint closed"), reason="shutdown")
            for dial in self._dials.values():
                dial.error = ConnectError("endpoint closed")
            self._tg.cancel_scope.cancel()
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"
            self._sock.close()

    # -- dialing and the pool ------------------------------------------------------------------

    def _pick(self, peer_id: PeerID) -> Connection | None:
        for conn in self._pool.get(peer_id, ()):
            if conn.state is State.READY:
                return conn
        return None

    async def _connect(self, peer: PeerAddress) -> Connection:
        dial = self._dials.get(peer.peer_id)
        if dial is None:
            dial = self._dials[peer.peer_id] = _Dial()
            assert self._tg is not None
            self._tg.start_soon(self._dial, peer, dial)
        # the dial task gives up after connect_timeout; this deadline is only a backstop
        with anyio.move_on_after(self.config.connect_timeout + 1.0):
            await dial.done.wait()
        if dial.conn is not None:
            return dial.conn
        raise renew(dial.error or ConnectError(f"could not connect to {peer}"))

    async def _dial(self, peer: PeerAddress, dial: _Dial) -> None:
        conn: Connection | None = None
        try:
            with anyio.fail_after(self.config.connect_timeout):
                addr = await resolve(self._driver_or_fail().sock, peer.host, peer.port)
                conn = self._new_client(peer.peer_id, addr)
                await conn.settled.wait()
            if conn.state is State.READY:
                dial.conn = conn
            else:
                dial.error = conn.error
        except TimeoutError:
            dial.error = ConnectError(
                f"no handshake with {peer} within {self.config.connect_timeout:g} s"
            )
            if conn is not None:
                conn.close(dial.error, reason="handshake timeout")
        except OSError as exc:
            dial.error = ConnectError(f"cannot reach {peer}: {exc}")
        finally:
            if self._dials.get(peer.peer_id) is dial:
                del self._dials[peer.peer_id]
            dial.done.set()

    def _new_client(self, peer_id: PeerID, addr: Address) -> Connection:
        now = anyio.current_time()
        quic = CoreConnection(
            configuration=self._loopback_client_config
            if is_loopback(addr[0])
            else self._client_config,
            peer_stream_limit=self._stream_limit(),
            pacing=self.config.pacing,
        )
        driver = self._driver_or_fail()
        conn = Connection(self, driver, quic, addr, now, expected_peer=peer_id)
        quic.connect(addr, now)
        driver.register(conn, [quic.host_cid])
        driver.flush(conn)
        return conn

    def _stream_limit(self) -> int:
        # Twice our limit at the QUIC level, so that excess streams reach us and get refused
        # (a typed error for the opener) instead of queueing silently in the peer's aioquic.
        return 2 * self.config.max_incoming_streams

    # -- ConnectionOwner -----------------------------------------------------------------------

    def connection_ready(self, conn: Connection) -> None:
        assert conn.remote_peer is not None
        if not conn.is_client:
            self._pending -= 1
        self._pool.setdefault(conn.remote_peer, []).append(conn)

    def connection_closed(self, conn: Connection) -> None:
        self._driver_or_fail().unregister(conn)
        if conn.remote_peer is not None:
            conns = self._pool.get(conn.remote_peer, [])
            if conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._pool[conn.remote_peer]
        elif not conn.is_client:
            self._pending -= 1

    def dispatch(self, stream: QuicByteStream) -> None:
        handler = self._handler
        if handler is None or self._tg is None or self._state != "running":
            stream.reset(StreamCode.REFUSED)
            return
        self._tg.start_soon(self._serve, handler, stream)

    async def _serve(self, handler: StreamHandler, stream: QuicByteStream) -> None:
        try:
            await handler(stream)
        except Exception:
            _log.exception("stream handler failed on %r; resetting the stream", stream)
            stream.reset(StreamCode.HANDLER_ERROR)
        finally:
            stream.reset(StreamCode.CANCELLED)  # a no-op unless the handler left it unfinished

    # -- driver callbacks ----------------------------------------------------------------------

    def _driver_or_fail(self) -> Driver:
        if self._driver is None:
            raise RuntimeError("the endpoint is not running")
        return self._driver

    def _accept(self, data: bytes, addr: Address, now: float) -> None:
        """A long-header datagram for no known connection: maybe a client's first Initial."""
        if self._state != "running" or len(data) < _MIN_INITIAL or self._pending >= _MAX_PENDING:
            return
        tokens = self._accept_tokens + (now - self._accept_time) * _ACCEPT_RATE
        self._accept_time = now
        if tokens < 1.0:
            self._accept_tokens = tokens
            return
        self._accept_tokens = min(tokens, _ACCEPT_BURST) - 1.0
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self._server_config.supported_versions
        ):
            return
        quic = CoreConnection(
            configuration=self._loopback_server_config
            if is_loopback(addr[0])
            else self._server_config,
            original_destination_connection_id=header.destination_cid,
            peer_stream_limit=self._stream_limit(),
            pacing=self.config.pacing,
        )
        try:
            quic.receive_datagram(data, addr, now)
            datagrams = quic.datagrams_to_send(now)
        except Exception:
            _log.debug("bad Initial from %s dropped", addr, exc_info=True)
            return
        if not datagrams:  # it did not decrypt: keep no state for junk
            return
        driver = self._driver_or_fail()
        conn = Connection(self, driver, quic, addr, now, expected_peer=None)
        self._pending += 1
        driver.register(conn, [header.destination_cid, quic.host_cid])
        driver.send(datagrams)
        driver.timer_changed(conn, quic.get_timer())

    def _maintain(self, now: float) -> None:
        """Keep-alive PINGs; close dead, idle and never-authenticated connections."""
        config = self.config
        driver = self._driver_or_fail()
        conns = list(driver.conns)
        if any(now - c.last_heard > config.dead_peer_timeout for c in conns) and not driver.poll(
            now
        ):
            return  # datagrams are queued unread: we are behind, not our peers
        for conn in conns:
            if conn.closed:
                continue
            if conn.state is not State.READY:
                if not conn.is_client and now - conn.created_at > config.connect_timeout:
                    conn.close(
                        ConnectError("no identity proof in time"),
                        CloseCode.AUTH_TIMEOUT,
                        "identity proof timeout",
                    )
                continue
            silent = now - conn.last_heard
            if silent > config.dead_peer_timeout:
                conn.close(PeerGone(f"nothing heard from {conn.remote_peer!r} for {silent:.1f} s"))
            elif (
                config.idle_timeout
                and not conn.streams
                and now - conn.idle_since > config.idle_timeout
            ):
                conn.close(PeerGone("connection closed after idling"), reason="idle")
            elif silent >= config.keepalive_interval and (
                now - conn.last_ping >= config.keepalive_interval
            ):
                conn.last_ping = now
                conn.quic.send_ping(next(self._ping_ids))
                driver.flush(conn)

    def __repr__(self) -> str:
        return f"<QuicEndpoint {self.peer_id!r} {self._host}:{self._port} {self._state}>"
