"""RPC errors: the error envelope <-> exception mapping, and foreign exceptions mapped once.

Deliberate errors cross the wire by type name: ``Busy`` (with ``retry_after``),
``LimitExceeded``, ``DeadlineExceeded`` and ``UnknownMethod`` come back as those types;
anything else as :class:`~distllm.errors.RemoteError` (type name and message).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from distllm.errors import (
    Busy,
    DeadlineExceeded,
    DistllmError,
    LimitExceeded,
    LocalProtocolError,
    PeerGone,
    RemoteError,
    RemoteProtocolError,
)
from distllm.rpc.envelope import RpcError

__all__ = ["UnknownMethod", "envelope_from_error", "error_from_envelope", "map_exceptions"]

#: Longest message text we put into (or keep from) an error envelope.
MAX_ERROR_TEXT = 4096


class UnknownMethod(RemoteError):
    """The peer has no handler for the method we called."""

    def __init__(self, message: str) -> None:
        super().__init__("UnknownMethod", message)


def envelope_from_error(exc: BaseException) -> RpcError:
    """The envelope that reports ``exc``, raised by a handler, to the caller."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return envelope_from_error(exc.exceptions[0])  # one failure inside a handler's tasks
    if isinstance(exc, Busy):
        return RpcError("Busy", _clip(exc.message), exc.retry_after)
    if isinstance(exc, LimitExceeded):
        return RpcError("LimitExceeded", _clip(str(exc)))
    if isinstance(exc, DeadlineExceeded):
        return RpcError("DeadlineExceeded", _clip(str(exc)))
    if isinstance(exc, RemoteError):
        # Relayed from a third peer: keep it a plain RemoteError, or an ``UnknownMethod`` of the
        # third peer would read as if the caller's own method were unknown.
        return RpcError("RemoteError", _clip(str(exc)))
    return RpcError(type(exc).__name__, _clip(str(exc)))


def error_from_envelope(envelope: RpcError) -> DistllmError:
    """The exception a caller raises for an error envelope it received."""
    text = _clip(envelope.message)
    match envelope.type_name:
        case "Busy":
            retry_after = envelope.retry_after
            if retry_after is None or not math.isfinite(retry_after) or retry_after < 0:
                retry_after = 1.0
            return Busy(text, retry_after)
        case "LimitExceeded":
            return LimitExceeded(text)
        case "DeadlineExceeded":
            return DeadlineExceeded(text)
        case "UnknownMethod":
            return UnknownMethod(text)
        case type_name:
            return RemoteError(_clip(type_name, 200), text)


def _clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate the foreign exceptions of the layers below into ``distllm.errors`` types.

    ``DistllmError``s and cancellation pass unchanged.
    """
    try:
        yield
    except DistllmError:
        raise
    except anyio.BrokenResourceError as exc:
        raise PeerGone(f"stream broken: {exc}") from exc
    except anyio.ClosedResourceError as exc:
        raise LocalProtocolError("the RPC stream is already closed") from exc
    except anyio.IncompleteRead as exc:
        raise RemoteProtocolError("the stream ended in the middle of a frame") from exc
    except ConnectionError as exc:
        raise PeerGone(str(exc)) from exc
