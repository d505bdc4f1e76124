"""One QUIC stream as an ``anyio.abc.ByteStream`` with back-pressure in both directions.

Send side: aioquic buffers whatever it is given until the peer acknowledges it, so ``send`` waits
while this stream's unacknowledged bytes reach ``stream_send_window``.

Receive side: data arrives through the connection's driver into ``_chunks``. The credit we grant
the peer (MAX_STREAM_DATA) is *bytes consumed by the application + stream_receive_window*, raised
by ``receive`` in steps of a quarter window, so a reader that stops reading stops the sender with
at most one window buffered here.

The driver calls the ``_on_*`` methods (synchronously, between batches of datagrams); the
application calls the public ones. Bytes leave ``_chunks`` only after every await, so a cancelled
``receive`` loses nothing. A ``send`` cancelled while it waits for room may have written a prefix
of its data (as with TCP).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from distllm.errors import PeerGone
from distllm.ids import PeerID
from distllm.transport.base import Stream
from distllm.transport.quic_core import CoreStream, unacked_bytes

if TYPE_CHECKING:
    from distllm.transport.quic_conn import Connection

__all__ = ["QuicByteStream", "StreamCode", "StreamReset"]


class StreamCode(enum.IntEnum):
    """Application error codes carried by RESET_STREAM and STOP_SENDING."""

    #: The application closed the stream before finishing it.
    CANCELLED = 0x1
    #: The receiver refused the stream: too many open streams, or no handler installed.
    REFUSED = 0x2
    #: The remote handler raised an exception.
    HANDLER_ERROR = 0x3


class StreamReset(PeerGone):
    """The peer reset this stream or stopped reading it; the connection itself may be fine.

    ``error_code`` is the peer's :class:`StreamCode` (or another application code).
    """

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


# (message, error code or None for a lost connection) - exceptions are built fresh per raise
_Failure = tuple[str, int | None]


def _error(failure: _Failure) -> PeerGone:
    message, code = failure
    return PeerGone(message) if code is None else StreamReset(message, code)


class QuicByteStream(Stream):
    """A bidirectional QUIC stream to an authenticated peer."""

    def __init__(
        self,
        conn: Connection,
        stream_id: int,
        core: CoreStream,
        *,
        incoming: bool,
        send_window: int,
        receive_window: int,
    ) -> None:
        self._conn = conn
        self._id = stream_id
        self._core = core  # aioquic's state of this stream: sender buffer, receive limit
        self.incoming = incoming
        self._send_window = send_window
        self._wake_room = send_window - send_window // 4
        self._receive_window = receive_window
        self._credit_step = receive_window // 4
        # receive side; invariant: self._buffered == sum(map(len, self._chunks)) <= window
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._consumed = 0
        self._fin_received = False
        self._receive_failure: _Failure | None = None
        self._receive_waiter: anyio.Event | None = None
        # send side
        self._eof_sent = False
        self._send_failure: _Failure | None = None
        self._send_waiter: anyio.Event | None = None
        self._sending = False
        self._closed = False
        self._registered = True  # in conn.streams, i.e. still expecting events

    # -- Stream API ----------------------------------------------------------------------------

    @property
    def remote_peer(self) -> PeerID:
        peer = self._conn.remote_peer
        assert peer is not None  # streams exist only on authenticated connections
        return peer

    @property
    def remote_address(self) -> tuple[str, int]:
        host, port = self._conn.addr[:2]
        return str(host), int(port)

    @property
    def stream_id(self) -> int:
        return self._id

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._receive_failure is not None:
                raise _error(self._receive_failure)
            if self._fin_received:
                raise anyio.EndOfStream
            if self._receive_waiter is not None:
                raise anyio.BusyResourceError("receiving from")
            waiter = self._receive_waiter = anyio.Event()
            try:
                await waiter.wait()
            finally:
                self._receive_waiter = None
        if self._closed:
            raise anyio.ClosedResourceError
        return self._take(max_bytes)

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._sending:
            raise anyio.BusyResourceError("sending to")
        self._check_can_send()
        total = len(item)
        if not total:
            return
        if total <= self._send_window - unacked_bytes(self._core):
            self._write(item)  # fast path: no slicing, no waiting
            return
        view = memoryview(item).cast("B")
        total = view.nbytes
        pos = 0
        self._sending = True
        try:
            while pos < total:
                room = self._send_window - unacked_bytes(self._core)
                if room <= 0:
                    await self._wait_for_room()
                    self._check_can_send()
                    continue
                end = min(total, pos + room)
                self._write(view[pos:end])
                pos = end
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            return
        if self._send_failure is not None:
            raise _error(self._send_failure)
        self._eof_sent = True
        self._conn.quic.send_stream_data(self._id, b"", end_stream=True)
        self._conn.flush_soon()
        self._unregister_if_done()

    async def aclose(self) -> None:
        # Nothing to await: this must work inside cancelled scopes (handler teardown, finally).
        self.reset(StreamCode.CANCELLED)

    def reset(self, error_code: int = StreamCode.CANCELLED) -> None:
        """Close now: abort each direction that is not finished (RESET_STREAM / STOP_SENDING).

        Data already followed by our FIN is still delivered. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._registered and not self._conn.closed:
            quic = self._conn.quic
            if not self._eof_sent and self._send_failure is None:
                quic.reset_sending(self._id, error_code)
            if not self._fin_received and self._receive_failure is None:
                quic.stop_receiving(self._id, error_code)
            self._conn.flush_soon()
        self._chunks.clear()
        self._buffered = 0
        self._wake()
        self._unregister()

    # -- helpers of the application side -------------------------------------------------------

    def _check_can_send(self) -> None:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._send_failure is not None:
            raise _error(self._send_failure)

    def _write(self, data: bytes | memoryview) -> None:
        # aioquic appends to a bytearray, which accepts any buffer: no copy here
        self._conn.quic.send_stream_data(self._id, data)  # type: ignore[arg-type]
        self._conn.flush_soon()

    async def _wait_for_room(self) -> None:
        waiter = self._send_waiter = anyio.Event()
        self._conn.send_blocked.add(self)
        try:
            await waiter.wait()
        finally:
            self._send_waiter = None
            self._conn.send_blocked.discard(self)

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        data = chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        elif chunks and len(data) + len(chunks[0]) <= max_bytes:
            # many small chunks (small datagrams): one join beats one receive() per packet
            parts = [data]
            size = len(data)
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        size = len(data)
        self._buffered -= size
        self._consumed += size
        if not self._fin_received and self._receive_failure is None:
            credit = self._consumed + self._receive_window
            if credit - self._core.max_stream_data_local >= self._credit_step:
                self._core.max_stream_data_local = credit  # announced by CoreConnection
                self._conn.flush_soon()
        return data

    # -- driver side ---------------------------------------------------------------------------

    def _on_data(self, data: bytes, fin: bool) -> None:
        if self._closed or self._receive_failure is not None:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        if fin:
            self._fin_received = True
        if self._receive_waiter is not None:
            self._receive_waiter.set()
        if fin:
            self._unregister_if_done()

    def _on_reset(self, error_code: int) -> None:
        """The peer reset its direction: unread data is dropped, receive raises."""
        if self._closed or self._fin_received or self._receive_failure is not None:
            return
        self._receive_failure = (f"stream reset by peer (code {error_code})", error_code)
        self._chunks.clear()
        self._buffered = 0
        self._wake()
        self._unregister_if_done()

    def _on_stop_sending(self, error_code: int) -> None:
        """The peer stopped reading; aioquic already reset our direction."""
        if self._closed or self._send_failure is not None:
            return
        self._send_failure = (f"peer stopped reading the stream (code {error_code})", error_code)
        self._wake()
        self._unregister_if_done()

    def _on_connection_lost(self, message: str) -> None:
        if not self._eof_sent and self._send_failure is None:
            self._send_failure = (message, None)
        if not self._fin_received and self._receive_failure is None:
            self._receive_failure = (message, None)
            self._chunks.clear()
            self._buffered = 0
        self._wake()
        self._registered = False

    def _wake_sender_if_room(self) -> None:
        waiter = self._send_waiter
        if waiter is not None and unacked_bytes(self._core) <= self._wake_room:
            waiter.set()

    def _wake(self) -> None:
        if self._receive_waiter is not None:
            self._receive_waiter.set()
        if self._send_waiter is not None:
            self._send_waiter.set()

    def _unregister_if_done(self) -> None:
        receiving = not self._fin_received and self._receive_failure is None
        sending = not self._eof_sent and self._send_failure is None
        if not receiving and not sending:
            self._unregister()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._conn.forget(self)

    def __repr__(self) -> str:
        return f"<QuicByteStream {self._id} to {self._conn.remote_peer!r}>"
