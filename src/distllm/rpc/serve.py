"""Serving one incoming RPC: read the opening frame, run the handler, send its outcome.

A handler's exception is reported to the caller as an error envelope and logged; it never
escapes. The caller's deadline arrives as a relative timeout and becomes our own deadline for
the handler, so the handler stops even if the caller's reset never reaches us.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import anyio

from distllm.config import RpcConfig
from distllm.errors import (
    Busy,
    DeadlineExceeded,
    DistllmError,
    LimitExceeded,
    LocalProtocolError,
    RemoteProtocolError,
    TransportError,
)
from distllm.rpc.channel import MessageChannel
from distllm.rpc.envelope import RpcError, RpcOpen
from distllm.rpc.errors import envelope_from_error
from distllm.rpc.methods import StreamMethod, UnaryMethod
from distllm.rpc.stream import RpcStream

__all__ = ["reply_error", "serve_call"]

logger = logging.getLogger("distllm.rpc")

#: Errors raised on purpose (or by the network): logged without a traceback.
_EXPECTED = (Busy, LimitExceeded, DeadlineExceeded, TransportError, RemoteProtocolError)


async def serve_call(
    channel: MessageChannel,
    methods: Mapping[str, UnaryMethod | StreamMethod],
    config: RpcConfig,
    handler_done: Callable[[], None],
) -> None:
    """Serve the call on ``channel``. Raises only the caller's faults and transport errors
    (``RemoteProtocolError``, ``TransportError``); the owner then closes (resets) the stream.

    ``handler_done`` is called once the handler has finished, before its outcome is sent, so a
    caller that waits for each reply never finds its previous call still counted."""
    opening: object = None
    with anyio.move_on_after(config.default_timeout):
        try:
            opening = await channel.receive()
        except anyio.EndOfStream:
            return  # the caller changed its mind before naming a method
    if opening is None:
        return  # nothing named within our own default deadline
    if not isinstance(opening, RpcOpen):
        raise RemoteProtocolError(
            f"an RPC stream must start with rpc.open, not {type(opening).__name__}"
        )
    timeout = opening.timeout
    if timeout is not None and not timeout > 0:  # also rejects NaN
        raise RemoteProtocolError(f"rpc.open timeout must be > 0 or null, got {timeout!r}")
    method = methods.get(opening.method)
    if method is None:
        await channel.send(RpcError("UnknownMethod", f"no method {opening.method[:200]!r}"))
        await channel.send_eof()
        return
    deadline = math.inf if timeout is None else anyio.current_time() + timeout
    with anyio.CancelScope(deadline=deadline) as scope:
        if isinstance(method, UnaryMethod):
            await _serve_unary(channel, opening.method, method, handler_done)
        else:
            await _serve_stream(channel, opening.method, method, handler_done)
    if scope.cancelled_caught:
        logger.debug(
            "%s from %r: its deadline (%g s) expired", opening.method, channel.remote_peer, timeout
        )


async def reply_error(channel: MessageChannel, error: BaseException) -> None:
    """End the call with an error envelope, then end of stream."""
    await channel.send(envelope_from_error(error))
    await channel.send_eof()


async def _serve_unary(
    channel: MessageChannel, name: str, method: UnaryMethod, handler_done: Callable[[], None]
) -> None:
    try:
        request = await channel.receive()
    except anyio.EndOfStream:
        raise RemoteProtocolError(f"{name}: the caller ended the call before its request") from None
    if not isinstance(request, method.request_type):
        raise RemoteProtocolError(
            f"{name} takes {method.request_type.__name__}, not {type(request).__name__}"
        )
    failures: list[DistllmError] = []
    async with anyio.create_task_group() as tg:
        # The caller sends nothing more until it has our reply: a reset means it gave up.
        tg.start_soon(_watch_caller, channel, name, tg.cancel_scope, failures)
        try:
            reply: object = await method.handler(channel.remote_peer, request)
        except Exception as exc:
            _log_failure(name, channel, exc)
            reply = envelope_from_error(exc)
        handler_done()
        try:
            try:
                frame = channel.encode(reply)
            except (LimitExceeded, LocalProtocolError) as exc:  # the handler's reply is unsendable
                _log_failure(name, channel, exc)
                frame = channel.encode(envelope_from_error(exc))
            await channel.send_encoded(frame)
            await channel.send_eof()
        except DistllmError as exc:  # kept out of the task group, which would wrap it
            failures.append(exc)
            tg.cancel_scope.cancel()
        # Leaving the task group waits for the watcher to see the caller's end of stream.
    if failures:
        raise failures[0]


async def _watch_caller(
    channel: MessageChannel,
    name: str,
    scope: anyio.CancelScope,
    failures: list[DistllmError],
) -> None:
    try:
        extra = await channel.receive()
    except anyio.EndOfStream:
        return
    except DistllmError as exc:
        failures.append(exc)
    else:
        failures.append(
            RemoteProtocolError(f"{name}: unexpected {type(extra).__name__} after the request")
        )
    scope.cancel()


async def _serve_stream(
    channel: MessageChannel, name: str, method: StreamMethod, handler_done: Callable[[], None]
) -> None:
    try:
        await method.handler(RpcStream(channel, name))
    except Exception as exc:
        handler_done()
        _log_failure(name, channel, exc)
        if not channel.eof_sent:  # else there is no way left to tell the caller
            await reply_error(channel, exc)  # a transport error here just ends the call
        return
    handler_done()
    await channel.send_eof()


def _log_failure(name: str, channel: MessageChannel, exc: BaseException) -> None:
    if isinstance(exc, _EXPECTED):
        logger.debug("%s from %r failed: %r", name, channel.remote_peer, exc)
    else:
        logger.error("handler of %s failed (call from %r)", name, channel.remote_peer, exc_info=exc)
