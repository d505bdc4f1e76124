"""Which errors of a hop the client recovers from, and the error it raises when it gives up."""

from __future__ import annotations

from distllm.client.errors import NoRouteError
from distllm.client.planner import RouteHop
from distllm.errors import DistllmError, LocalProtocolError
from distllm.protocol.span_messages import ADAPTER_NAME

__all__ = ["RouteFailedError", "check_adapter", "is_hop_failure"]


def check_adapter(adapter: str | None) -> None:
    """``ValueError`` for a name no server could have loaded (before anything is sent)."""
    if adapter is not None and (
        not isinstance(adapter, str) or ADAPTER_NAME.fullmatch(adapter) is None
    ):
        raise ValueError(
            f"adapter must be None or 1..64 characters of [A-Za-z0-9_.-], got {adapter!r}"
        )


def is_hop_failure(exc: BaseException) -> bool:
    """Does ``exc`` mean "this server failed us" (route around it) rather than a bug of ours?

    Timeouts, lost peers, a peer's errors (``Busy``, ``RemoteError`` -- ``UnknownAdapter`` from a
    server that announced the adapter included --, ``LimitExceeded``...) and its protocol
    violations are; ``LocalProtocolError`` (our bug), ``NoRouteError`` (already
    the verdict of a failover) and everything else are not.
    """
    if isinstance(exc, LocalProtocolError | NoRouteError):
        return False
    return isinstance(exc, DistllmError | TimeoutError)


class RouteFailedError(DistllmError):
    """Blocks ``[start, end)`` of ``model`` could not be served: ``attempts`` servers in a row
    failed, or (``within`` set) no replacement worked within ``within`` seconds.

    ``hop`` is the last server tried; the last failure is ``__cause__`` (and ``cause``).
    """

    def __init__(
        self,
        model: str,
        hop: RouteHop,
        attempts: int,
        cause: BaseException,
        *,
        within: float | None = None,
    ) -> None:
        self.model = model
        self.hop = hop
        self.start = hop.start
        self.end = hop.end
        self.attempts = attempts
        self.cause = cause
        self.within = within
        how = (
            f"found no working replacement within {within:g} s ({attempts} failures)"
            if within is not None
            else f"failed {attempts} times in a row"
        )
        super().__init__(
            f"blocks [{hop.start}, {hop.end}) of model {model!r} {how}; last: {hop.peer!r} at "
            f"{hop.address.host}:{hop.address.port}: {type(cause).__name__}: {cause}"
        )
