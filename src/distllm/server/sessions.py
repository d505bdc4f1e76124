"""The inference sessions open on a server: admission (how many, and how much cache they may
claim), the cancel scopes that let the server end them all when it stops, and each session's
inbox -- its caller's messages and the steps other servers relay into it (``span.relay``), in
arrival order. Sessions are found by the caller's session id, so that relayed steps and
``span.info`` questions reach them.

By default a session claims nothing when it opens: its rows take KV pages as they grow, and a
step that cannot get pages fails with ``Busy``. With ``reserve_max_length`` (how Petals admits)
a session claims ``max_length x batch_size`` tokens of the cache up front and is refused when
they are not left -- kept here as a ledger, for comparisons.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from distllm.errors import Busy, DistllmError
from distllm.ids import PeerID
from distllm.protocol.span_messages import InferenceStep
from distllm.protocol.span_session import SpanSession

__all__ = ["Arrival", "Inbox", "ServerSession", "SessionRegistry"]

#: ``retry_after`` suggested when the server holds as many sessions as it may.
_FULL_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Arrival:
    """A message for the session loop: from the caller (anything; the loop checks it), or a
    step another server relayed."""

    message: object
    relayed: bool = False


#: What the session loop takes: an arrival, the error that broke the caller's stream, or
#: ``None``: the caller's end of stream.
Inbox = Arrival | DistllmError | None


@dataclass(eq=False)
class ServerSession:
    """One open session as the server sees it."""

    key: int  # the server's own id: cache sequences and scheduler items are named by it
    client_id: bytes  # the caller's name for it: relayed steps and span.info find it by it
    peer: PeerID
    machine: SpanSession
    compression: str  # codec of its outputs
    reserved_tokens: int  # claimed up front (reserve_max_length); 0 otherwise
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: step_id of the last step taken from the inbox (sent or relayed), before computing it;
    #: -1: none yet. Relayed steps not above it are stale.
    last_step_id: int = -1
    #: Cancel scopes of the span.relay handlers feeding this session: they end with it.
    _relays: set[anyio.CancelScope] = field(default_factory=set)
    # No buffer: whoever delivers waits until the loop takes it (one step in flight).
    _inbox_send: MemoryObjectSendStream[Inbox] = field(init=False)
    _inbox_receive: MemoryObjectReceiveStream[Inbox] = field(init=False)

    def __post_init__(self) -> None:
        self._inbox_send, self._inbox_receive = anyio.create_memory_object_stream[Inbox]()

    def __repr__(self) -> str:
        return f"ServerSession({self.key}, {self.client_id.hex()[:16]}, peer={self.peer!r})"

    async def put(self, item: Inbox) -> None:
        """Hand the loop what came from the caller (waits until it is taken)."""
        await self._inbox_send.send(item)

    async def deliver(self, step: InferenceStep) -> bool:
        """Hand the loop a relayed step; ``False`` once the session has ended."""
        try:
            await self._inbox_send.send(Arrival(step, relayed=True))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    async def take(self) -> Inbox:
        """The next arrival, in arrival order."""
        return await self._inbox_receive.receive()

    def add_relay(self, scope: anyio.CancelScope) -> None:
        """A relay handler feeds this session: :meth:`end` cancels ``scope``."""
        self._relays.add(scope)

    def remove_relay(self, scope: anyio.CancelScope) -> None:
        self._relays.discard(scope)

    def end(self) -> None:
        """The session is over: its relay handlers end, its inbox closes. Never blocks."""
        for scope in self._relays:
            scope.cancel()
        self._relays.clear()
        self._inbox_send.close()
        self._inbox_receive.close()


class SessionRegistry:
    """Admits, tracks and forgets sessions."""

    def __init__(self, max_sessions: int, cache_tokens: int, reserve_max_length: bool) -> None:
        self._max_sessions = max_sessions
        self._cache_tokens = cache_tokens
        self._reserve = reserve_max_length
        self._keys = itertools.count(1)
        self._open: dict[int, ServerSession] = {}
        # The caller's session id -> the latest session opened under it (ids may repeat).
        self._by_client: dict[bytes, ServerSession] = {}
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
        self._by_client[client_id] = session
        self._reserved += claim
        return session

    def find(self, client_id: bytes) -> ServerSession | None:
        """The open session the caller named ``client_id`` (the latest, if several)."""
        return self._by_client.get(client_id)

    def forget(self, session: ServerSession) -> None:
        """The session ended; its claim returns. Forgetting twice is harmless."""
        if self._open.pop(session.key, None) is not None:
            self._reserved -= session.reserved_tokens
        if self._by_client.get(session.client_id) is session:
            del self._by_client[session.client_id]
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
