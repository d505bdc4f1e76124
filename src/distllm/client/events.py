"""What a session reports about its route: for demos, logs and tests.

A session appends every event to ``session.events`` and hands it to its ``on_event`` callback
(if any), synchronously, as it happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from distllm.client.planner import RouteHop

__all__ = ["HopFailed", "RouteChanged", "SessionEvent", "SessionStats"]


@dataclass(frozen=True, slots=True)
class RouteChanged:
    """The session's route is now ``route``: opened (``reason="opened"``) or repaired after a
    failure (``"failover"``), at session position ``position``."""

    reason: str
    position: int
    route: tuple[RouteHop, ...]


@dataclass(frozen=True, slots=True)
class HopFailed:
    """Hop ``index`` (``hop``) failed with ``error`` at session position ``position``; its peer
    is banned for ``banned_for`` seconds (0: not banned, e.g. our own cancellation)."""

    position: int
    index: int
    hop: RouteHop
    error: BaseException
    banned_for: float


SessionEvent = RouteChanged | HopFailed
EventCallback = Callable[[SessionEvent], None]


@dataclass
class SessionStats:
    """Counters of one session."""

    steps: int = 0  # successful steps
    tokens: int = 0  # new tokens per row over those steps
    failovers: int = 0  # hops replaced after a failure
    replayed_tokens: int = 0  # positions (per row) replayed to replacement servers
    relayed_steps: int = 0  # hop steps that came from the previous server (``span.relay``)
    lost_relays: int = 0  # relayed steps that did not arrive (the client sent them itself)
    #: Seconds from each failure to the end of the step it interrupted (recovery included).
    recovery_seconds: list[float] = field(default_factory=list)
