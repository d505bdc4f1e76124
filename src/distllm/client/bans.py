"""Which peers to keep out of routes after failures, and for how long (pure: ``now`` comes in).

A peer that fails is banned for ``base * factor**(k - 1)`` seconds, capped at ``cap``, where
``k`` counts its consecutive failures. Petals bans for 15·2^k s; distllm fails over within a
second, so the defaults start at 1 s: a peer that merely hiccuped is tried again soon, one
that keeps failing is tried ever more rarely.

Failures reported while a peer is already banned come from requests sent before the ban (the
planner routes around banned peers): they are the same outage and do not escalate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distllm.ids import PeerID

__all__ = ["BanList"]


@dataclass(slots=True)
class _Ban:
    failures: int  # consecutive failures since the last success, >= 0
    until: float  # wall time at which the ban ends; a peer is banned while now < until


class BanList:
    """Banned peers with exponential backoff."""

    def __init__(self, *, base: float = 1.0, factor: float = 2.0, cap: float = 60.0) -> None:
        for name, value, low in (("base", base, 0.0), ("factor", factor, 1.0), ("cap", cap, base)):
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be finite and >= {low!r}, got {value!r}")
        self.base = base
        self.factor = factor
        self.cap = cap
        self._bans: dict[PeerID, _Ban] = {}

    def ban(self, peer: PeerID, now: float, *, at_least: float = 0.0) -> float:
        """Record a failure of ``peer`` at ``now``; returns the seconds it stays banned.

        ``at_least`` lengthens the ban (e.g. a ``Busy`` reply's ``retry_after``).
        """
        if not (math.isfinite(at_least) and at_least >= 0):
            raise ValueError(f"at_least must be finite and >= 0, got {at_least!r}")
        entry = self._bans.get(peer)
        if entry is not None and now < entry.until:
            entry.until = max(entry.until, now + at_least)  # same outage: no escalation
            return entry.until - now
        failures = 1 if entry is None else entry.failures + 1
        try:
            grown = self.base * self.factor ** (failures - 1)
        except OverflowError:  # far past any cap
            grown = math.inf
        duration = max(min(grown, self.cap), at_least)
        self._bans[peer] = _Ban(failures, now + duration)
        return duration

    def on_success(self, peer: PeerID) -> None:
        """``peer`` served a request: its next failure starts the backoff afresh.

        A running ban is kept: the reply may answer a request sent before the failure.
        """
        entry = self._bans.get(peer)
        if entry is not None:
            entry.failures = 0

    def is_banned(self, peer: PeerID, now: float) -> bool:
        entry = self._bans.get(peer)
        return entry is not None and now < entry.until

    def banned(self, now: float) -> set[PeerID]:
        """The peers banned at ``now`` (pass it to the planner)."""
        return {peer for peer, entry in self._bans.items() if now < entry.until}

    def failures(self, peer: PeerID) -> int:
        """Consecutive failures of ``peer`` since its last success."""
        entry = self._bans.get(peer)
        return 0 if entry is None else entry.failures
