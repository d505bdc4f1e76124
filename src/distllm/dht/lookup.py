"""Iterative Kademlia lookup as a sans-IO state machine (pure, synchronous, no clock).

The driver loop::

    lookup = Lookup(target, [e.address for e in table.nearest(target)], local_id=me)
    while not lookup.done:
        for address in lookup.next_queries():
            start a FIND_NODE / FIND_VALUE call to ``address`` (with a deadline)
        wait for one call to end, then lookup.on_reply(...) or lookup.on_failure(...)
        (and table.on_seen / table.on_failure for that peer)
    use lookup.result; cancel calls still in flight; table.mark_lookup(target, now)

A peer is queried at most once. Only the replies of peers this lookup queried count, so a lying
peer can make us *query* the fake peers it names (each fails to authenticate), but it cannot
make them *responders*: results are the peers that answered us themselves.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from distllm.errors import LocalProtocolError
from distllm.ids import PEER_ID_BYTES, PeerAddress, PeerID

__all__ = ["Lookup", "LookupMode", "LookupResult", "LookupStats"]

V = TypeVar("V")


class LookupMode(enum.Enum):
    FIND_NODE = "find_node"
    FIND_VALUE = "find_value"


class _State(enum.Enum):
    CANDIDATE = 0  # known, not yet queried
    IN_FLIGHT = 1  # queried, no answer yet
    RESPONDED = 2  # answered (terminal)
    FAILED = 3  # call failed, or lookup told so (terminal)


@dataclass(frozen=True, slots=True)
class LookupResult(Generic[V]):
    #: The k closest peers that answered, nearest first.
    closest: tuple[PeerAddress, ...]
    #: FIND_VALUE: (responder, value) for each responder that returned a value, in reply order.
    values: tuple[tuple[PeerID, V], ...]
    #: FIND_VALUE: responders that answered without a value, nearest first (where to cache).
    without_value: tuple[PeerAddress, ...]


@dataclass(frozen=True, slots=True)
class LookupStats:
    queries: int  # calls started
    replies: int
    failures: int
    #: Longest referral chain behind a responder (initial peers are hop 1).
    hops: int


class Lookup(Generic[V]):
    """Find the ``k`` peers closest to ``target`` (and, in FIND_VALUE mode, values stored there).

    Terminates when the ``k`` closest known peers that have not failed have all answered: then
    no unqueried peer is closer than any of them. In FIND_VALUE mode it also ends as soon as
    ``quorum`` responders returned a value (``quorum=None``: run to the end, merging values from
    every responder). ``result`` may be read at any time, e.g. when an overall deadline expires.
    """

    def __init__(
        self,
        target: bytes,
        initial: Iterable[PeerAddress],
        *,
        k: int = 20,
        alpha: int = 3,
        mode: LookupMode = LookupMode.FIND_NODE,
        quorum: int | None = 1,
        local_id: PeerID | None = None,
    ) -> None:
        if len(target) != PEER_ID_BYTES:
            raise ValueError(f"target must be {PEER_ID_BYTES} bytes, got {len(target)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha!r}")
        if quorum is not None and quorum < 1:
            raise ValueError(f"quorum must be >= 1 or None, got {quorum!r}")
        self.target = bytes(target)
        self.k = k
        self.alpha = alpha
        self.mode = mode
        self.quorum = quorum if mode is LookupMode.FIND_VALUE else None
        self._goal = int.from_bytes(target, "big")
        self._local_id = local_id  # never queried (our own id comes back in replies)
        # Every peer ever learned, sorted by xor distance to the target (distances are unique).
        self._order: list[tuple[int, PeerID]] = []
        # The keys of _state, _address and _hop are exactly the peers in _order.
        self._state: dict[PeerID, _State] = {}
        self._address: dict[PeerID, PeerAddress] = {}  # first address heard wins
        self._hop: dict[PeerID, int] = {}
        self._in_flight = 0  # == count of IN_FLIGHT states; <= alpha
        self._values: list[tuple[PeerID, V]] = []
        self._queries = self._replies = self._failures = 0
        for address in initial:
            self._learn(address, hop=1)

    # -- driver API ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        if self.quorum is not None and len(self._values) >= self.quorum:
            return True
        return all(self._state[p] is _State.RESPONDED for p in self._shortlist())

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def next_queries(self) -> list[PeerAddress]:
        """Peers to query now (marked in flight); at most ``alpha`` calls run at once."""
        if self.done:
            return []
        chosen = []
        for peer in self._shortlist():
            if self._in_flight >= self.alpha:
                break
            if self._state[peer] is _State.CANDIDATE:
                self._state[peer] = _State.IN_FLIGHT
                self._in_flight += 1
                self._queries += 1
                chosen.append(self._address[peer])
        return chosen

    def on_reply(
        self, peer: PeerID, closer_peers: Iterable[PeerAddress], values: V | None = None
    ) -> None:
        """``peer`` answered with peers closer to the target and, for FIND_VALUE, a value
        (``None``: it has none). Replies from peers not in flight are ignored. Only the first
        ``k`` peers of a reply are considered (an honest peer sends at most ``k``)."""
        if values is not None and self.mode is not LookupMode.FIND_VALUE:
            raise LocalProtocolError("values given to a FIND_NODE lookup")
        if self._state.get(peer) is not _State.IN_FLIGHT:
            return
        self._state[peer] = _State.RESPONDED
        self._in_flight -= 1
        self._replies += 1
        if values is not None:
            self._values.append((peer, values))
        hop = self._hop[peer] + 1
        for count, address in enumerate(closer_peers):
            if count >= self.k:
                break
            self._learn(address, hop)

    def on_failure(self, peer: PeerID) -> None:
        """The call to ``peer`` failed (timeout, refused, malformed reply...)."""
        if self._state.get(peer) is not _State.IN_FLIGHT:
            return
        self._state[peer] = _State.FAILED
        self._in_flight -= 1
        self._failures += 1

    @property
    def result(self) -> LookupResult[V]:
        responders = [p for _, p in self._order if self._state[p] is _State.RESPONDED]
        with_value = {p for p, _ in self._values}
        return LookupResult(
            closest=tuple(self._address[p] for p in responders[: self.k]),
            values=tuple(self._values),
            without_value=tuple(self._address[p] for p in responders if p not in with_value)
            if self.mode is LookupMode.FIND_VALUE
            else (),
        )

    @property
    def stats(self) -> LookupStats:
        hops = [self._hop[p] for p, s in self._state.items() if s is _State.RESPONDED]
        return LookupStats(self._queries, self._replies, self._failures, max(hops, default=0))

    # -- internals -----------------------------------------------------------------------------

    def _learn(self, address: PeerAddress, hop: int) -> None:
        peer = address.peer_id
        if peer in self._state or peer == self._local_id:
            return
        bisect.insort(self._order, (int(peer) ^ self._goal, peer))
        self._state[peer] = _State.CANDIDATE
        self._address[peer] = address
        self._hop[peer] = hop

    def _shortlist(self) -> list[PeerID]:
        """The k closest peers known that have not failed, nearest first."""
        shortlist: list[PeerID] = []
        for _, peer in self._order:
            if self._state[peer] is not _State.FAILED:
                shortlist.append(peer)
                if len(shortlist) == self.k:
                    break
        return shortlist
