"""A message channel: registered messages as length-prefixed frames over one transport stream.

The channel is the RPC layer's edge to the transport: every transport call goes through
:func:`~distllm.rpc.errors.map_exceptions`, and every received frame is checked against the
:class:`~distllm.config.WireLimits` before it is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio

from distllm.config import WireLimits
from distllm.errors import DistllmError, LocalProtocolError, RemoteProtocolError
from distllm.ids import PeerID
from distllm.rpc.errors import map_exceptions
from distllm.transport.base import Stream
from distllm.wire.framing import FrameDecoder, encode_frame
from distllm.wire.messages import decode_message, encode_message

__all__ = ["Buffer", "MessageChannel", "encode_frames"]

Buffer = bytes | bytearray | memoryview

#: Frame pieces smaller than this are copied into one buffer so a frame costs few transport
#: sends; larger ones (tensor payloads) are sent as they are, without a copy.
_COALESCE_BYTES = 64 * 1024
#: Longest a close may take; it runs shielded, also inside cancelled scopes.
_CLOSE_TIMEOUT = 1.0


def _coalesce(buffers: Sequence[Buffer]) -> Iterator[Buffer]:
    """The bytes of ``buffers`` in order, small neighbours joined into one write."""
    pending = bytearray()
    for buf in buffers:
        if len(buf) < _COALESCE_BYTES:
            pending += buf
            if len(pending) < _COALESCE_BYTES:
                continue
            buf, pending = pending, bytearray()
        elif pending:
            yield bytes(pending)
            pending = bytearray()
        yield buf
    if pending:
        yield bytes(pending)


def encode_frames(limits: WireLimits, *messages: object) -> list[Buffer]:
    """The frames of ``messages``, in order; ``LimitExceeded`` if one breaks ``limits``."""
    frames: list[Buffer] = []
    for message in messages:
        frames.extend(encode_frame(encode_message(message, limits), limits.max_frame_bytes))
    return frames


class MessageChannel:
    """Sends and receives whole messages on ``stream``.

    At most one task sends and one task receives at a time (sends are serialised by a lock, so
    frames never interleave). A send cancelled half-way leaves a partial frame behind: the
    channel refuses further sends and must be closed.
    """

    def __init__(self, stream: Stream, limits: WireLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._decoder = FrameDecoder(limits.max_frame_bytes)
        self._send_lock = anyio.Lock()
        self._receiving = False
        self._send_broken = False
        #: The transport error that ended our direction; raised again by later sends.
        self._send_failure: DistllmError | None = None
        self.eof_sent = False
        self.eof_received = False
        self._closed = False

    @property
    def remote_peer(self) -> PeerID:
        return self._stream.remote_peer

    def encode(self, message: object) -> list[Buffer]:
        """The frame of ``message``; ``LimitExceeded`` if it breaks our limits (nothing sent)."""
        return encode_frames(self._limits, message)

    async def send(self, *messages: object) -> None:
        """Send the messages, in order, as one write when they are small."""
        buffers = [buf for message in messages for buf in self.encode(message)]
        await self.send_encoded(buffers)

    async def send_encoded(self, buffers: Sequence[Buffer]) -> None:
        async with self._send_lock:
            self._check_can_send()
            # Until the last write returns, a cancellation may leave part of a frame behind.
            self._send_broken = True
            try:
                with map_exceptions():
                    for chunk in _coalesce(buffers):
                        # Both transports take any bytes-like object: payloads go uncopied.
                        await self._stream.send(chunk)  # type: ignore[arg-type]
            except DistllmError as exc:
                self._send_failure = exc
                raise
            self._send_broken = False

    def _check_can_send(self) -> None:
        if self._send_failure is not None:
            raise self._send_failure
        if self._send_broken:
            raise LocalProtocolError("an earlier send was cancelled mid-frame")
        if self.eof_sent:
            raise LocalProtocolError("cannot send after send_eof()")

    async def send_eof(self) -> None:
        async with self._send_lock:
            if self.eof_sent:
                return
            self._check_can_send()
            with map_exceptions():
                await self._stream.send_eof()
            self.eof_sent = True

    async def receive(self) -> object:
        """The next message. ``anyio.EndOfStream`` when the peer finished at a frame boundary;
        ``RemoteProtocolError`` for a malformed or oversized frame or a truncated stream."""
        if self._receiving:
            raise LocalProtocolError("two tasks are receiving on one RPC stream")
        self._receiving = True
        try:
            frame = await self._next_frame()
        finally:
            self._receiving = False
        return decode_message(frame, self._limits)

    async def _next_frame(self) -> memoryview:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                with map_exceptions():
                    data = await self._stream.receive()
            except anyio.EndOfStream:
                self.eof_received = True
                if not self._decoder.at_boundary():
                    raise RemoteProtocolError("the stream ended in the middle of a frame") from None
                raise
            self._decoder.feed(data)

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly: closing will not reset the stream."""
        return self.eof_sent and self.eof_received

    async def aclose(self) -> None:
        """Close the stream; one not finished in both directions is reset. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                with map_exceptions():
                    await self._stream.aclose()
            except DistllmError:
                pass  # a broken stream has nothing left to close
