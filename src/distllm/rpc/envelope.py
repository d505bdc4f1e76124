"""The RPC envelope: the messages the RPC layer itself puts on a stream (see protocol.md §6).

Every RPC stream starts with an :class:`RpcOpen` from the caller. Requests, responses and stream
items are ordinary registered messages; a failure travels as an :class:`RpcError` frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from distllm.wire.messages import message

__all__ = ["RpcError", "RpcOpen"]


@message("rpc.open")
@dataclass(frozen=True, slots=True)
class RpcOpen:
    """First frame of every RPC stream, sent by the caller."""

    #: Name of the method, as registered with ``add_unary``/``add_stream``.
    method: str
    #: Seconds the caller will wait, counted from when the callee reads this frame (relative, so
    #: no clock synchronisation is needed). ``None``: the caller set no deadline (streams only).
    timeout: float | None


@message("rpc.error")
@dataclass(frozen=True, slots=True)
class RpcError:
    """The call failed at the callee; the last frame it sends before its end of stream."""

    #: Exception type name, e.g. ``"Busy"``, ``"UnknownMethod"``, ``"ValueError"``.
    type_name: str
    message: str
    #: Seconds after which a retry may succeed (``Busy`` only).
    retry_after: float | None = None
