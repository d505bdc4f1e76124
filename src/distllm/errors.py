"""The one exception hierarchy of distllm.

Every error distllm raises on purpose derives from :class:`DistllmError`. The split follows
h11: :class:`LocalProtocolError` means *we* broke a rule (a bug: it is never caught and retried),
:class:`RemoteProtocolError` means *the peer* broke one (the peer is at fault; drop it).

Which call raises what is listed in ``docs/errors.md``.
"""

from __future__ import annotations

__all__ = [
    "Busy",
    "ConnectError",
    "DeadlineExceeded",
    "DistllmError",
    "LimitExceeded",
    "LocalProtocolError",
    "PeerGone",
    "PeerIdentityMismatch",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "TransportError",
]


class DistllmError(Exception):
    """Base class of every error distllm raises deliberately."""


class TransportError(DistllmError):
    """The connection to a peer could not be made or was lost."""


class ConnectError(TransportError):
    """Dialing a peer failed: unreachable, refused, or the handshake did not complete in time."""


class PeerGone(TransportError):
    """A live connection died (peer killed, network cut, idle/keep-alive timeout).

    Every stream that was open on the connection fails with this error.
    """


class PeerIdentityMismatch(TransportError):
    """The peer proved ownership of a key that does not hash to the PeerID we expected."""

    def __init__(self, expected: object, actual: object) -> None:
        super().__init__(f"expected peer {expected}, but the remote key belongs to {actual}")
        self.expected = expected
        self.actual = actual


class ProtocolError(DistllmError):
    """A rule of the wire protocol was broken."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of order. The peer is at fault."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids. This is a bug in the caller; never retried."""


class RemoteError(DistllmError):
    """A remote handler raised an error; it travelled back to us as its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class Busy(DistllmError):
    """The peer is at capacity; try again after ``retry_after`` seconds (or elsewhere)."""

    def __init__(self, message: str = "peer is busy", retry_after: float = 1.0) -> None:
        super().__init__(f"{message} (retry after {retry_after:g} s)")
        self.message = message
        self.retry_after = retry_after


class LimitExceeded(DistllmError):
    """A configured limit (message size, tensor shape, concurrent streams, ...) was exceeded."""


class DeadlineExceeded(DistllmError, TimeoutError):
    """A call did not complete before its deadline. Also a builtin :class:`TimeoutError`."""
