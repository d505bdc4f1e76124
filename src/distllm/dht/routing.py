"""Kademlia routing table: k-buckets over the 256-bit id space (pure, synchronous, no clock).

Bucket scheme: *splitting*. The table starts as one bucket covering the whole space; only the
bucket whose range holds the local id splits (in halves) when a peer arrives and it is full.
This is the lazy form of the classic 256 fixed buckets: the buckets that exist are exactly the
ones with peers in them, so about log2(N) buckets need refreshing instead of 256 mostly empty
ones. Every other bucket keeps its first k live contacts (long-lived nodes are the most likely
to stay, and an attacker cannot flush them by flooding new ids); newcomers wait in a bounded
replacement cache and are promoted when a contact fails.

Only peers that proved their id (they answered us or called us over the authenticated
transport) should be passed to :meth:`RoutingTable.on_seen`; peers merely *mentioned* by others
belong in a lookup, not here.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from distllm.ids import PEER_ID_BYTES, PeerAddress, PeerID

__all__ = [
    "ID_BITS",
    "ID_SPACE",
    "BucketView",
    "RoutingEntry",
    "RoutingTable",
    "key_id",
]

ID_BITS = 8 * PEER_ID_BYTES
ID_SPACE = 1 << ID_BITS
_KEY_DOMAIN = b"distllm-dht-key\x00"


def key_id(key: str | bytes) -> bytes:
    """The 32-byte position of a DHT key in the node id space (text keys hash as UTF-8)."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return hashlib.sha256(_KEY_DOMAIN + raw).digest()


@dataclass(frozen=True, slots=True)
class RoutingEntry:
    """A contact: who, where, when we last heard from it, how many calls in a row failed."""

    peer_id: PeerID
    address: PeerAddress
    last_seen: float
    failures: int = 0  # consecutive; reset to 0 whenever the peer is seen alive


@dataclass(frozen=True, slots=True)
class BucketView:
    """A read-only snapshot of one bucket (for inspection, tests and metrics)."""

    lo: int
    hi: int
    entries: tuple[RoutingEntry, ...]  # least recently seen first
    replacements: tuple[RoutingEntry, ...]  # least recently seen first
    last_lookup: float


@dataclass(slots=True)
class _Bucket:
    lo: int  # inclusive; lo % (hi - lo) == 0 and hi - lo is a power of two (a prefix range)
    hi: int  # exclusive
    # Contacts whose int id lies in [lo, hi); len <= k; ordered least recently seen first
    # (so `now` given to the table must not go backwards).
    entries: dict[PeerID, RoutingEntry] = field(default_factory=dict)
    # Candidates waiting for a slot; in [lo, hi); disjoint from entries; at most
    # replacement_cache_size; oldest first. Non-empty only while the bucket is full (a freed
    # slot is refilled from here at once) and never in the bucket covering the local id (that
    # one splits instead).
    replacements: dict[PeerID, RoutingEntry] = field(default_factory=dict)
    # When a lookup last targeted this range (-inf: never). Refresh bookkeeping only.
    last_lookup: float = float("-inf")

    def covers(self, value: int) -> bool:
        return self.lo <= value < self.hi


class RoutingTable:
    """k-buckets around ``local_id``; see the module docstring for the policy."""

    def __init__(
        self,
        local_id: PeerID,
        k: int = 20,
        *,
        max_failures: int = 3,
        replacement_cache_size: int | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures!r}")
        cache = k if replacement_cache_size is None else replacement_cache_size
        if cache < 0:
            raise ValueError(f"replacement_cache_size must be >= 0, got {cache!r}")
        self.local_id = local_id
        self.k = k
        self.max_failures = max_failures
        self.replacement_cache_size = cache
        self._local = int(local_id)
        # Sorted by lo; ranges are disjoint, contiguous, and cover [0, ID_SPACE).
        self._buckets: list[_Bucket] = [_Bucket(0, ID_SPACE)]
        # self._los[i] == self._buckets[i].lo (for bisect).
        self._los: list[int] = [0]

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(b.entries) for b in self._buckets)

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, PeerID) and peer in self._bucket_for(int(peer)).entries

    def __iter__(self) -> Iterator[RoutingEntry]:
        for bucket in self._buckets:
            yield from bucket.entries.values()

    def get(self, peer: PeerID) -> RoutingEntry | None:
        return self._bucket_for(int(peer)).entries.get(peer)

    def nearest(
        self, target: bytes | PeerID, k: int | None = None, *, exclude: PeerID | None = None
    ) -> list[RoutingEntry]:
        """The ``k`` (default: the table's k) contacts closest to ``target``, nearest first.

        A FIND_NODE handler should pass ``exclude=<requester>``: the requester knows itself,
        and a slot spent on it can hide the node it is looking for (seen with small k).
        """
        count = self.k if k is None else k
        goal = int(target) if isinstance(target, PeerID) else int.from_bytes(target, "big")
        # A few thousand entries at most: a heap over all of them is simple and exact.
        candidates = (e for e in self if e.peer_id != exclude)
        return heapq.nsmallest(count, candidates, key=lambda e: int(e.peer_id) ^ goal)

    def buckets(self) -> list[BucketView]:
        return [
            BucketView(
                b.lo,
                b.hi,
                tuple(b.entries.values()),
                tuple(b.replacements.values()),
                b.last_lookup,
            )
            for b in self._buckets
        ]

    # -- updates -------------------------------------------------------------------------------

    def on_seen(self, peer: PeerID, address: PeerAddress, now: float) -> RoutingEntry | None:
        """Record that ``peer`` proved alive at ``address``.

        Returns the contact to ping when the peer's bucket is full: the newcomer then waits in
        the replacement cache; the driver pings the returned (least recently seen) contact and
        reports the outcome with :meth:`on_seen` (it stays) or :meth:`on_failure` (the newest
        replacement takes its place). Returns ``None`` otherwise.
        """
        if address.peer_id != peer:
            raise ValueError(f"address {address} does not belong to {peer!r}")
        if peer == self.local_id:
            return None
        value = int(peer)
        while True:
            bucket = self._bucket_for(value)
            entry = bucket.entries.pop(peer, None)
            if entry is not None:  # known: refresh and move to the most-recent end
                bucket.entries[peer] = replace(entry, address=address, last_seen=now, failures=0)
                return None
            if len(bucket.entries) < self.k:
                bucket.replacements.pop(peer, None)
                bucket.entries[peer] = RoutingEntry(peer, address, now)
                return None
            if bucket.covers(self._local):
                self._split(bucket)  # the new peer may still land in a full bucket: loop
                continue
            if self.replacement_cache_size > 0:
                bucket.replacements.pop(peer, None)
                bucket.replacements[peer] = RoutingEntry(peer, address, now)
                if len(bucket.replacements) > self.replacement_cache_size:
                    del bucket.replacements[next(iter(bucket.replacements))]
            return next(iter(bucket.entries.values()))

    def on_failure(self, peer: PeerID, now: float) -> bool:
        """Record that a call to ``peer`` failed; returns True if it was evicted.

        A contact is evicted at once when a replacement is waiting (the classic ping-the-oldest
        policy), otherwise only after ``max_failures`` failures in a row: an empty slot helps
        no one, and a briefly unreachable long-lived node is likely to come back.
        """
        del now  # part of the signature so a time-aware policy needs no API change
        bucket = self._bucket_for(int(peer))
        if bucket.replacements.pop(peer, None) is not None:
            return False
        entry = bucket.entries.get(peer)
        if entry is None:
            return False
        failures = entry.failures + 1
        if bucket.replacements or failures >= self.max_failures:
            self._evict(bucket, peer)
            return True
        bucket.entries[peer] = replace(entry, failures=failures)  # keeps its LRU position
        return False

    def remove(self, peer: PeerID) -> bool:
        """Forget ``peer`` (contact or replacement); returns True if it was known."""
        bucket = self._bucket_for(int(peer))
        if bucket.replacements.pop(peer, None) is not None:
            return True
        if peer not in bucket.entries:
            return False
        self._evict(bucket, peer)
        return True

    # -- refresh -------------------------------------------------------------------------------

    def mark_lookup(self, target: bytes | PeerID, now: float) -> None:
        """Note that a lookup for ``target`` ran, so its bucket needs no refresh for a while."""
        goal = int(target) if isinstance(target, PeerID) else int.from_bytes(target, "big")
        self._bucket_for(goal).last_lookup = now

    def buckets_to_refresh(self, now: float, interval: float, rng: random.Random) -> list[bytes]:
        """A random target id in each bucket not looked up within ``interval`` seconds.

        Returning a target counts as starting its lookup (the bucket is marked at ``now``), so
        calling again before the lookups end does not return the same buckets twice.
        """
        targets = []
        for bucket in self._buckets:
            if now - bucket.last_lookup >= interval:
                bucket.last_lookup = now
                value = rng.randrange(bucket.lo, bucket.hi)
                targets.append(value.to_bytes(PEER_ID_BYTES, "big"))
        return targets

    # -- internals -----------------------------------------------------------------------------

    def _bucket_for(self, value: int) -> _Bucket:
        return self._buckets[bisect.bisect_right(self._los, value) - 1]

    def _evict(self, bucket: _Bucket, peer: PeerID) -> None:
        del bucket.entries[peer]
        if bucket.replacements:  # promote the most recently seen candidate
            newest = bucket.replacements.pop(next(reversed(bucket.replacements)))
            # It may have been seen before some contacts were: keep the LRU order.
            merged = sorted([*bucket.entries.values(), newest], key=lambda e: e.last_seen)
            bucket.entries = {e.peer_id: e for e in merged}

    def _split(self, bucket: _Bucket) -> None:
        # Only the bucket holding the local id splits, and that bucket never queues
        # replacements (it splits instead), so only its entries move.
        mid = (bucket.lo + bucket.hi) // 2
        low = _Bucket(bucket.lo, mid, last_lookup=bucket.last_lookup)
        high = _Bucket(mid, bucket.hi, last_lookup=bucket.last_lookup)
        for peer, entry in bucket.entries.items():  # keeps the LRU order on both sides
            (low if int(peer) < mid else high).entries[peer] = entry
        index = self._buckets.index(bucket)
        self._buckets[index : index + 1] = [low, high]
        self._los[index : index + 1] = [low.lo, high.lo]
