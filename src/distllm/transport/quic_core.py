"""aioquic's sans-IO ``QuicConnection``, adapted to distllm. Every touch of aioquic internals
(private attributes, pinned to aioquic 1.7.2 in pyproject) lives in this module.

What we change:

- **Receive credit.** aioquic doubles a stream's MAX_STREAM_DATA whenever the peer has sent half
  of it, whether or not the application read anything, so a reader that stops reading keeps
  receiving. Here the reader alone raises ``QuicStream.max_stream_data_local`` (to bytes consumed
  + window, see :mod:`distllm.transport.quic_stream`) and :meth:`_write_stream_limits` only
  announces it.
- **Peer stream limit.** aioquic lets a peer keep 128 bidirectional streams open; we announce
  our own limit instead.
- **Pacing** can be switched off (its timer wakes every one or two packets on fast links).
- **ACK timing**: the driver makes pending ACKs due at the end of each batch of datagrams, so
  they ride on replies, and only keeps aioquic's 1 ms delay for a lone packet.
- **Bursts**: the driver sends a congestion window in bursts rather than building it whole.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch
from cryptography import x509

__all__ = ["CoreConnection", "CoreStream", "unacked_bytes"]

CoreStream = QuicStream


class _NoPacer:
    """Replaces aioquic's ``QuicPacketPacer``: never holds a packet back."""

    def next_send_time(self, now: float) -> None:
        return None

    def update_after_send(self, now: float) -> None:
        pass

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pass


class CoreConnection(QuicConnection):
    """A ``QuicConnection`` whose receive windows follow the application's reads."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        peer_stream_limit: int,
        pacing: bool,
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        # Announced in the transport parameters, which are serialised later, at the handshake.
        # aioquic adds one per stream it discards, so this stays the number of open streams.
        limit = self._local_max_streams_bidi
        limit.value = limit.sent = peer_stream_limit
        if not pacing:
            self._loss._pacer = _NoPacer()  # type: ignore[assignment]

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        # Called by aioquic for every stream in every packet it builds: keep it cheap.
        limit = stream.max_stream_data_local
        if stream.max_stream_data_local_sent == limit:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,  # a lost frame is announced again
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(limit)
        stream.max_stream_data_local_sent = limit

    def datagrams_to_send_capped(self, now: float, max_bytes: int) -> list[tuple[bytes, Any]]:
        """``datagrams_to_send``, but at most about ``max_bytes`` of new flight. aioquic builds
        a whole congestion window at once; sent in bursts, the peer starts on the first packets
        while we build the next ones."""
        cc = self._loss._cc
        window = cc.congestion_window
        cap = self._loss.bytes_in_flight + max_bytes
        if window <= cap:
            return self.datagrams_to_send(now)
        cc.congestion_window = cap  # only the packet builder reads it while sending
        try:
            return self.datagrams_to_send(now)
        finally:
            if cc.congestion_window == cap:  # unless sending itself changed it
                cc.congestion_window = window

    def schedule_ack(self, at: float) -> None:
        """Move a pending ACK of application packets to ``at``. aioquic delays every ACK by
        1 ms (its timer granularity), so an ACK never rides on an immediate reply."""
        space = self._spaces.get(Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = at

    # -- read access to aioquic internals ------------------------------------------------------

    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented, once its TLS Certificate message arrived."""
        tls = getattr(self, "tls", None)  # created when the handshake starts
        return None if tls is None else tls._peer_certificate

    def server_initial_cid(self) -> bytes | None:
        """The server's initial source connection ID (in the authenticated transport params)."""
        if self._is_client:
            return self._remote_initial_source_connection_id
        return self._local_initial_source_connection_id

    def termination(self) -> ConnectionTerminated | None:
        """Why the connection ended, as soon as it is closing or draining (aioquic reports it only
        after the closing period of three probe timeouts)."""
        if self._state in END_STATES:
            return self._close_event
        return None

    def stream_for_send(self, stream_id: int) -> QuicStream:
        """aioquic's state of a stream we open (created now, before any data is sent)."""
        return self._get_or_create_stream_for_send(stream_id)

    def stream_state(self, stream_id: int) -> QuicStream | None:
        return self._streams.get(stream_id)

    def stop_receiving(self, stream_id: int, error_code: int) -> None:
        """STOP_SENDING, unless aioquic already discarded the stream."""
        if stream_id in self._streams:
            self.stop_stream(stream_id, error_code)

    def reset_sending(self, stream_id: int, error_code: int) -> None:
        """RESET_STREAM, unless aioquic already discarded the stream."""
        if stream_id in self._streams:
            self.reset_stream(stream_id, error_code)


def unacked_bytes(stream: QuicStream) -> int:
    """Bytes the application wrote to ``stream`` that the peer has not acknowledged yet
    (aioquic keeps them, sent or not, in the sender's buffer)."""
    return len(stream.sender._buffer)
