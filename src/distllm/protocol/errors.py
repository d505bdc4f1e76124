"""Errors of the span protocol: a span request the server cannot serve as asked (pure).

They cross the wire by class name (``RemoteError.type_name`` at the caller; see
``docs/protocol.md`` §8). All are the peer's fault, hence :class:`RemoteProtocolError`s; the
inference session that receives one ends.
"""

from __future__ import annotations

from distllm.errors import RemoteProtocolError

__all__ = [
    "InvalidPosition",
    "InvalidTensor",
    "SpanRequestError",
    "UnknownAdapter",
    "UnknownForward",
    "UnknownSession",
    "WrongSpan",
]


class SpanRequestError(RemoteProtocolError):
    """A span request breaks a rule of the span protocol."""


class WrongSpan(SpanRequestError):
    """The request names a model or blocks this server does not hold."""


class InvalidTensor(SpanRequestError):
    """A tensor has the wrong shape or dtype, or holds NaN or infinities."""


class InvalidPosition(SpanRequestError):
    """A step starts beyond the session's position or would run past its ``max_length``."""


class UnknownAdapter(SpanRequestError):
    """The request names an adapter this server has not loaded."""


class UnknownForward(SpanRequestError):
    """A backward names a ``forward_id`` this server never saw from the caller."""


class UnknownSession(SpanRequestError):
    """A relayed step names an inference session this server does not hold."""
