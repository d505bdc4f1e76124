"""What every transport offers the layers above: authenticated byte streams to peers.

Two implementations: :mod:`distllm.transport.quic` (real UDP sockets, QUIC + TLS 1.3) and
:mod:`distllm.transport.memory` (in-process, with fault injection, for tests). The RPC layer is
written against these protocols only.

Contract of an :class:`Endpoint`:

- It is an async context manager owning one task group. Entering it starts listening; leaving it
  closes every connection (their streams fail with ``PeerGone``) and cancels every handler task.
- ``open_stream(peer)`` reuses the live connection to ``peer.peer_id`` or dials ``peer.host:port``.
  Dialing fails with ``ConnectError`` (unreachable / no handshake within ``connect_timeout``) or
  ``PeerIdentityMismatch`` (the process there proves another PeerID). Authentication is mutual:
  the accepting side learns the dialer's verified PeerID as ``stream.remote_peer``.
- Each incoming stream is passed to the stream handler in a new task of the endpoint's task
  group; when the handler returns the stream is closed (reset if not cleanly finished). An
  exception escaping a handler is logged and resets only that stream; the endpoint keeps serving.
  Incoming streams with no handler installed are reset.
- When a connection dies (peer killed, network cut: nothing heard for ``dead_peer_timeout``),
  every pending and future operation on its streams raises ``PeerGone``.

Contract of a :class:`Stream` (an ``anyio.abc.ByteStream``):

- ``send`` takes any bytes-like object (``bytes``, ``memoryview`` — tensors are not copied on the
  way in) and applies back-pressure: it waits while the stream's unacknowledged bytes exceed the
  send window. ``send_eof`` half-closes our direction; the peer's ``receive`` then raises
  ``anyio.EndOfStream`` after the buffered bytes.
- ``receive`` returns at least one byte, raises ``anyio.EndOfStream`` after the peer half-closed,
  ``PeerGone`` if the connection died or the peer reset the stream, and
  ``anyio.ClosedResourceError`` if we closed it. A cancelled ``receive`` loses no bytes.
- ``aclose`` is idempotent and works per direction: bytes we already finished with ``send_eof``
  are still delivered; a direction not yet finished is reset (ours) or stopped (theirs).
- On QUIC a stream reaches the peer's handler only once its first byte or FIN arrives.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import anyio.abc

from distllm.ids import PeerAddress, PeerID

__all__ = ["Endpoint", "Stream", "StreamHandler"]


class Stream(anyio.abc.ByteStream):
    """One bidirectional, ordered, reliable byte stream to an authenticated peer."""

    @property
    @abstractmethod
    def remote_peer(self) -> PeerID:
        """The verified identity of the other side."""

    @property
    @abstractmethod
    def remote_address(self) -> tuple[str, int]:
        """The peer's (host, port) as seen by this endpoint."""


StreamHandler = Callable[[Stream], Awaitable[None]]


@runtime_checkable
class Endpoint(Protocol):
    """A local peer: one identity, one listening address, many connections and streams."""

    @property
    def peer_id(self) -> PeerID: ...

    @property
    def address(self) -> PeerAddress:
        """The dialable address of this endpoint (valid once entered)."""
        ...

    def set_stream_handler(self, handler: StreamHandler | None) -> None:
        """Install the callback for streams opened by peers (``None`` rejects them)."""
        ...

    async def open_stream(self, peer: PeerAddress) -> Stream:
        """Open a new stream to ``peer``, dialing it if no connection is alive."""
        ...

    async def disconnect(self, peer_id: PeerID) -> None:
        """Close the connection to ``peer_id`` if there is one (its streams get ``PeerGone``)."""
        ...

    def is_connected(self, peer_id: PeerID) -> bool: ...
