"""An RPC stream: typed messages in both directions, ending with end-of-stream or an error."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Self, TypeVar

import anyio

from distllm.errors import DistllmError, PeerGone, RemoteProtocolError
from distllm.ids import PeerID
from distllm.rpc.channel import Buffer, MessageChannel
from distllm.rpc.envelope import RpcError, RpcOpen
from distllm.rpc.errors import error_from_envelope

__all__ = ["RpcStream"]

T = TypeVar("T")

#: After a send fails because the peer closed the stream, how long we look for the error frame
#: it sent before closing (it travels ahead of the close, so it is usually already here).
_PROBE_TIMEOUT = 0.5


class RpcStream:
    """One RPC stream as seen by either side: ``send`` messages, ``receive`` the peer's.

    ``receive`` raises ``anyio.EndOfStream`` once the peer called ``send_eof`` (or its handler
    returned), and the error the peer reported if it ended the call with one. Iterating yields
    messages until the end of stream.
    """

    def __init__(self, channel: MessageChannel, method: str) -> None:
        self._channel = channel
        self._method = method
        #: Messages read ahead while looking for the peer's error frame.
        self._read_ahead: deque[object] = deque()
        #: The error the peer ended the stream with, raised by every later receive.
        self._failure: DistllmError | None = None

    @property
    def remote_peer(self) -> PeerID:
        return self._channel.remote_peer

    @property
    def method(self) -> str:
        return self._method

    async def send(self, message: object) -> None:
        """Send one message. ``LimitExceeded`` (nothing sent) if it breaks our limits."""
        await self.send_frames(self._channel.encode(message))

    async def send_frames(self, frames: Sequence[Buffer]) -> None:
        """Send frames encoded by :meth:`MessageChannel.encode`, in one write when small."""
        try:
            await self._channel.send_encoded(frames)
        except PeerGone as gone:
            # The peer may have ended the call with an error and closed; report that instead.
            with anyio.move_on_after(_PROBE_TIMEOUT):
                await self._read_until_failure()
            if self._failure is not None:
                raise self._failure from gone
            raise

    async def send_eof(self) -> None:
        """We will send nothing more; the peer's ``receive`` raises ``EndOfStream``."""
        await self._channel.send_eof()

    async def receive(self) -> object:
        if self._read_ahead:
            return self._read_ahead.popleft()
        if self._failure is not None:
            raise self._failure
        message = await self._channel.receive()
        if isinstance(message, RpcError):
            self._failure = error_from_envelope(message)
            raise self._failure
        if isinstance(message, RpcOpen):
            raise RemoteProtocolError("rpc.open in the middle of a stream")
        return message

    async def receive_as(self, message_type: type[T]) -> T:
        """The next message, which must be a ``message_type`` (else ``RemoteProtocolError``)."""
        message = await self.receive()
        if not isinstance(message, message_type):
            raise RemoteProtocolError(
                f"{self._method}: expected {message_type.__name__}, got {type(message).__name__}"
            )
        return message

    async def _read_until_failure(self) -> None:
        try:
            while self._failure is None:
                message = await self._channel.receive()
                if isinstance(message, RpcError):
                    self._failure = error_from_envelope(message)
                else:
                    self._read_ahead.append(message)
        except (anyio.EndOfStream, DistllmError):
            pass  # no error frame: the original failure stands

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> object:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        return f"RpcStream({self._method!r}, peer={self.remote_peer!r})"
