"""The RPC endpoint: serves registered methods and calls other peers' methods.

One RPC is one transport stream. The caller's first frame is ``rpc.open`` (method name and
relative timeout); see ``docs/protocol.md`` §6 for the frame sequences.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import anyio
import anyio.abc

from distllm.config import RpcConfig
from distllm.errors import (
    Busy,
    DeadlineExceeded,
    DistllmError,
    LocalProtocolError,
    RemoteProtocolError,
)
from distllm.ids import PeerAddress, PeerID
from distllm.rpc.channel import MessageChannel, encode_frames
from distllm.rpc.envelope import RpcOpen
from distllm.rpc.errors import map_exceptions
from distllm.rpc.methods import StreamHandler, StreamMethod, UnaryMethod
from distllm.rpc.serve import reply_error, serve_call
from distllm.rpc.stream import RpcStream
from distllm.transport.base import Endpoint, Stream

__all__ = ["RpcEndpoint"]

logger = logging.getLogger("distllm.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_DEFAULT_CONFIG = RpcConfig()
#: ``retry_after`` we suggest to a peer over its concurrent-call limit, in seconds.
BUSY_RETRY_AFTER = 0.1
#: How long we try to tell a peer that broke the protocol what it did, before resetting.
_GOODBYE_TIMEOUT = 1.0


class RpcEndpoint:
    """Unary calls and message streams over an entered transport :class:`Endpoint`.

    An async context manager: entering installs it as the transport's stream handler; every
    incoming call runs in a task of its task group, and leaving cancels them.
    """

    def __init__(self, transport: Endpoint, config: RpcConfig = _DEFAULT_CONFIG) -> None:
        self._transport = transport
        self._config = config
        self._methods: dict[str, UnaryMethod | StreamMethod] = {}
        #: Calls each peer has running here; its entry is removed at zero.
        self._active: dict[PeerID, int] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def transport(self) -> Endpoint:
        return self._transport

    @property
    def config(self) -> RpcConfig:
        return self._config

    @property
    def peer_id(self) -> PeerID:
        return self._transport.peer_id

    @property
    def address(self) -> PeerAddress:
        return self._transport.address

    def active_calls(self, peer: PeerID) -> int:
        """Calls ``peer`` has running here now."""
        return self._active.get(peer, 0)

    # -- serving ------------------------------------------------------------------------------

    def add_unary(
        self,
        method: str,
        handler: Callable[[PeerID, Req], Awaitable[object]],
        request_type: type[Req],
    ) -> None:
        """Serve ``method``: ``handler(caller, request)`` returns the response message; an
        exception it raises goes back to the caller as an error (see :mod:`distllm.rpc.errors`).
        """
        self._add(method, UnaryMethod(handler, request_type))

    def add_stream(self, method: str, handler: StreamHandler) -> None:
        """Serve ``method`` as a message stream; ``handler`` returning ends the call."""
        self._add(method, StreamMethod(handler))

    def remove(self, method: str) -> None:
        """Stop serving ``method`` (calls already running finish; new ones get UnknownMethod).
        A service that restarts on the same endpoint (a server moving its span) needs this."""
        self._methods.pop(method, None)

    def _add(self, name: str, method: UnaryMethod | StreamMethod) -> None:
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        self._methods[name] = method

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("an RpcEndpoint can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._transport.set_stream_handler(self._on_stream)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._transport.set_stream_handler(None)
        assert self._task_group is not None  # entered
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def _on_stream(self, stream: Stream) -> None:
        # The transport closes the stream when we return: wait for our task to finish with it.
        task_group = self._task_group
        if task_group is None or task_group.cancel_scope.cancel_called:
            return
        done = anyio.Event()
        task_group.start_soon(self._serve, stream, done)
        await done.wait()

    async def _serve(self, stream: Stream, done: anyio.Event) -> None:
        channel = MessageChannel(stream, self._config.limits)
        peer = stream.remote_peer
        try:
            running = self._active.get(peer, 0)
            if running >= self._config.max_concurrent_calls_per_peer:
                busy = Busy(f"{running} calls of yours are running here", BUSY_RETRY_AFTER)
                with anyio.move_on_after(self._config.default_timeout):
                    await reply_error(channel, busy)
                return
            self._active[peer] = running + 1
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    self._release(peer)

            try:
                await serve_call(channel, self._methods, self._config, release)
            finally:
                release()
        except RemoteProtocolError as exc:
            logger.warning("call from %r reset: %s", peer, exc)
            if not channel.eof_sent:  # say why before the reset: the peer's bug is easier found
                with anyio.move_on_after(_GOODBYE_TIMEOUT), suppress(DistllmError):
                    await reply_error(channel, exc)
        except LocalProtocolError:  # our own bug: log it loudly, keep serving everybody else
            logger.exception("serving a call from %r failed", peer)
        except DistllmError as exc:
            logger.debug("call from %r ended: %r", peer, exc)
        except Exception:  # our own bug as well
            logger.exception("serving a call from %r failed", peer)
        finally:
            await channel.aclose()
            done.set()

    def _release(self, peer: PeerID) -> None:
        left = self._active[peer] - 1
        if left:
            self._active[peer] = left
        else:
            del self._active[peer]

    # -- calling ------------------------------------------------------------------------------

    @overload
    async def call(
        self,
        peer: PeerAddress,
        method: str,
        request: object,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (travels to the callee, see call())
        response_type: type[Resp],
    ) -> Resp: ...

    @overload
    async def call(
        self,
        peer: PeerAddress,
        method: str,
        request: object,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        response_type: None = None,
    ) -> object: ...

    async def call(
        self,
        peer: PeerAddress,
        method: str,
        request: object,
        *,
        # Not just a local fail_after: the callee learns it and bounds its handler with it.
        timeout: float | None = None,  # noqa: ASYNC109
        response_type: type[Any] | None = None,
    ) -> object:
        """Call ``method`` at ``peer`` with one request message; return its response message.

        Raises ``DeadlineExceeded`` after ``timeout`` seconds (default: ``config.default_timeout``),
        the peer's reported error (``Busy``, ``LimitExceeded``, ``UnknownMethod``,
        ``RemoteError``), ``LimitExceeded`` before sending a request over our limits,
        ``RemoteProtocolError`` for a malformed reply (or one not a ``response_type``), and
        transport errors (``ConnectError``, ``PeerIdentityMismatch``, ``PeerGone``) unchanged.
        """
        limit = self._config.default_timeout if timeout is None else timeout
        if not limit > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        limits = self._config.limits
        # Encode first: a request over our limits fails here, before any byte is sent.
        frames = encode_frames(limits, RpcOpen(method, limit), request)
        with anyio.CancelScope(deadline=anyio.current_time() + limit):
            with map_exceptions():
                transport_stream = await self._transport.open_stream(peer)
            channel = MessageChannel(transport_stream, limits)
            try:
                stream = RpcStream(channel, method)
                await stream.send_frames(frames)
                try:
                    reply = await stream.receive()
                except anyio.EndOfStream:
                    raise RemoteProtocolError(
                        f"{method}: the callee ended without a reply"
                    ) from None
                if response_type is not None and not isinstance(reply, response_type):
                    raise RemoteProtocolError(
                        f"{method}: expected {response_type.__name__}, got {type(reply).__name__}"
                    )
                with suppress(DistllmError):  # we have the reply; a failed goodbye is no error
                    await channel.send_eof()  # lets the callee finish the call cleanly
                return reply
            finally:
                await channel.aclose()
        raise DeadlineExceeded(f"{method} at {peer.peer_id!r}: no reply within {limit:g} s")

    @asynccontextmanager
    async def open_stream(
        self,
        peer: PeerAddress,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (travels to the callee)
    ) -> AsyncIterator[RpcStream]:
        """Open a message stream to ``method`` at ``peer``.

        With ``timeout``, the whole call (opening, every message, closing) must end within that
        many seconds, else ``DeadlineExceeded``; without, the stream lives until the block ends
        and each wait on the peer should sit under the caller's own deadline. Leaving the block
        normally sends end-of-stream; leaving it by an exception resets the stream.
        """
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")
        frames = encode_frames(self._config.limits, RpcOpen(method, timeout))
        deadline = anyio.current_time() + timeout if timeout is not None else float("inf")
        with anyio.CancelScope(deadline=deadline) as scope:
            with map_exceptions():
                transport_stream = await self._transport.open_stream(peer)
            channel = MessageChannel(transport_stream, self._config.limits)
            try:
                stream = RpcStream(channel, method)
                await stream.send_frames(frames)
                yield stream
                with suppress(DistllmError):  # the callee may already be gone: nothing to tell
                    await channel.send_eof()
            finally:
                await channel.aclose()
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"{method} at {peer.peer_id!r}: not done within {timeout:g} s")
