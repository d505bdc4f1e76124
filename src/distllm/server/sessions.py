"""The inference sessions open on a server: admission (how many, and how much cache they may
claim) and the cancel scopes that let the server end them all when it stops.

By default a session claims nothing when it opens: its rows take KV pages as they grow, and a
step that cannot get pages fails with ``Busy``. With ``reserve_max_length`` (how Petals admits)
a session claims ``max_length x batch_size`` tokens of the cache up front and is refused when
they are not left -- kept here as a ledger, for comparisons.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import anyio

from distllm.errors import Busy
from distllm.ids import PeerID
from distllm.protocol.span_session import SpanSession

__all__ = ["ServerSession", "SessionRegistry"]

#: ``retry_after`` suggested when the server holds as many sessions as it may.
_FULL_RETRY_AFTER = 1.0


@dataclass(eq=False)
class ServerSession:
    """One open session as the server sees it."""

    key: int  # the server's own id: cache sequences and scheduler items are named by it
    client_id: bytes  # the caller's name for it (logs)
    peer: PeerID
    machine: SpanSession
    compression: str  # codec of its outputs
    reserved_tokens: int  # claimed up front (reserve_max_length); 0 otherwise
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def __repr__(self) -> str:
        return f"ServerSession({self.key}, {self.client_id.hex()[:16]}, peer={self.peer!r})"


class SessionRegistry:
    """Admits, tracks and forgets sessions."""

    def __init__(self, max_sessions: int, cache_tokens: int, reserve_max_length: bool) -> None:
        self._max_sessions = max_sessions
        self._cache_tokens = cache_tokens
        self._reserve = reserve_max_length
        self._keys = itertools.count(1)
        self._open: dict[int, ServerSession] = {}
        # Invariant: _reserved == sum of reserved_tokens of the open sessions <= _cache_tokens.
        self._reserved = 0
        self._drained: anyio.Event | None = None  # set once no session is open

    def __len__(self) -> int:
        return len(self._open)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    def admit(
        self, client_id: bytes, peer: PeerID, machine: SpanSession, compression: str
    ) -> ServerSession:
        """Register a new session, or raise ``Busy`` when there is no room for it."""
        if len(self._open) >= self._max_sessions:
            raise Busy(
                f"{len(self._open)} sessions are open, the most this server takes",
                _FULL_RETRY_AFTER,
            )
        claim = 0
        if self._reserve:
            claim = machine.params.max_length * machine.params.batch_size
            left = self._cache_tokens - self._reserved
            if claim > left:
                raise Busy(
                    f"the session would reserve {claim} cache tokens; {left} are left",
                    _FULL_RETRY_AFTER,
                )
        session = ServerSession(next(self._keys), client_id, peer, machine, compression, claim)
        self._open[session.key] = session
        self._reserved += claim
        return session

    def forget(self, session: ServerSession) -> None:
        """The session ended; its claim returns. Forgetting twice is harmless."""
        if self._open.pop(session.key, None) is not None:
            self._reserved -= session.reserved_tokens
        if not self._open and self._drained is not None:
            self._drained.set()

    def cancel_all(self) -> None:
        """End every open session (the server stops)."""
        for session in self._open.values():
            session.scope.cancel()

    async def wait_drained(self) -> None:
        """Wait until no session is open (their handlers have finished)."""
        if self._open:
            self._drained = anyio.Event()
            await self._drained.wait()
