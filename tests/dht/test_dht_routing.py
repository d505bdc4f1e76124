"""RoutingTable: brute-force oracle for nearest(), bucket policy, refresh, stateful invariants."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from distllm.dht.routing import ID_SPACE, BucketView, RoutingEntry, RoutingTable, key_id
from distllm.ids import PeerAddress, PeerID

TOP = ID_SPACE - 1


def pid(value: int) -> PeerID:
    return PeerID(value.to_bytes(32, "big"))


def addr(peer: PeerID, port: int = 31337) -> PeerAddress:
    return PeerAddress(peer, "127.0.0.1", port)


def entry_of(table: RoutingTable, peer: PeerID) -> RoutingEntry:
    entry = table.get(peer)
    assert entry is not None, f"{peer!r} is not in the table"
    return entry


ids = st.integers(0, TOP)
# ("near", bits, x): an id at xor distance < 2**bits from the local id (splits at every scale);
# ("crowd", bit, x): one of 8 ids sharing one far bucket (fills it: ping candidates, cache).
PeerSpec = int | tuple[str, int, int]
peer_specs = st.one_of(
    ids,
    st.tuples(st.just("near"), st.integers(1, 256), st.integers(0, TOP)),
    st.tuples(st.just("crowd"), st.sampled_from([255, 200, 3]), st.integers(0, 7)),
)


def resolve(local: int, spec: PeerSpec) -> int:
    if isinstance(spec, int):
        return spec
    kind, bits, x = spec
    if kind == "near":
        return local ^ (x % (1 << bits))
    return local ^ (1 << bits) ^ x


def check_invariants(table: RoutingTable) -> None:
    views = table.buckets()
    assert views[0].lo == 0 and views[-1].hi == ID_SPACE
    seen: set[PeerID] = set()
    own = 0
    for view, following in zip(views, [*views[1:], None], strict=True):
        size = view.hi - view.lo
        assert size > 0 and size & (size - 1) == 0 and view.lo % size == 0  # a prefix range
        if following is not None:
            assert view.hi == following.lo
        covers_local = view.lo <= int(table.local_id) < view.hi
        own += covers_local
        assert len(view.entries) <= table.k
        assert len(view.replacements) <= table.replacement_cache_size
        if view.replacements:
            assert len(view.entries) == table.k and not covers_local
        for entry in (*view.entries, *view.replacements):
            assert view.lo <= int(entry.peer_id) < view.hi
            assert entry.peer_id != table.local_id
            assert entry.peer_id not in seen
            assert entry.address.peer_id == entry.peer_id
            assert 0 <= entry.failures < table.max_failures
            seen.add(entry.peer_id)
        assert [e.last_seen for e in view.entries] == sorted(e.last_seen for e in view.entries)
    assert own == 1
    listed = list(table)
    assert len(listed) == len(table) == len({e.peer_id for e in listed})
    for entry in listed:
        assert entry.peer_id in table and table.get(entry.peer_id) == entry


# -- nearest() against brute force -----------------------------------------------------------


@given(
    local=ids,
    members=st.lists(peer_specs, max_size=120),
    target=ids,
    k=st.integers(1, 6),
    count=st.integers(0, 30),
)
@settings(max_examples=150, deadline=None)
def test_nearest_equals_brute_force(
    local: int, members: list[PeerSpec], target: int, k: int, count: int
) -> None:
    table = RoutingTable(pid(local), k=k)
    for now, member in enumerate(members):
        value = resolve(local, member)
        table.on_seen(pid(value), addr(pid(value)), float(now))
    stored = [e.peer_id for e in table]
    expected = sorted(stored, key=lambda p: int(p) ^ target)[:count]
    assert [e.peer_id for e in table.nearest(target.to_bytes(32, "big"), count)] == expected
    check_invariants(table)


@given(local=ids, members=st.sets(ids, max_size=60), target=ids)
@settings(max_examples=50, deadline=None)
def test_big_k_keeps_everyone_and_nearest_is_exact(
    local: int, members: set[int], target: int
) -> None:
    table = RoutingTable(pid(local), k=64)
    for value in members:
        table.on_seen(pid(value), addr(pid(value)), 0.0)
    expected = sorted(members - {local}, key=lambda v: v ^ target)[:64]
    assert [int(e.peer_id) for e in table.nearest(pid(target))] == expected


def test_nearest_exclude() -> None:
    table = RoutingTable(pid(0), k=4)
    for value in (1, 2, 3):
        table.on_seen(pid(value), addr(pid(value)), 0.0)
    assert [int(e.peer_id) for e in table.nearest(pid(2), 3, exclude=pid(2))] == [3, 1]


def test_key_id() -> None:
    assert key_id("model/3") == key_id(b"model/3")
    assert len(key_id("x")) == 32 and key_id("x") != key_id("y")


# -- bucket policy ---------------------------------------------------------------------------


def far_table(k: int = 2) -> tuple[RoutingTable, list[PeerID]]:
    """Local id 0; peers in the top half of the space, which never splits."""
    table = RoutingTable(pid(0), k=k, max_failures=3)
    peers = [pid((1 << 255) + i) for i in range(5)]
    return table, peers


def test_full_bucket_prefers_old_contacts_and_returns_ping_candidate() -> None:
    table, peers = far_table()
    assert table.on_seen(peers[0], addr(peers[0]), 1.0) is None
    assert table.on_seen(peers[1], addr(peers[1]), 2.0) is None
    candidate = table.on_seen(peers[2], addr(peers[2]), 3.0)
    assert candidate is not None and candidate.peer_id == peers[0]  # least recently seen
    assert peers[2] not in table and len(table) == 2
    # The oldest answers the ping: it stays and becomes the most recent.
    table.on_seen(peers[0], addr(peers[0]), 4.0)
    assert [e.peer_id for e in table] == [peers[1], peers[0]]
    # The next newcomer is asked to ping peers[1]; that ping fails: the newest replacement wins.
    candidate = table.on_seen(peers[3], addr(peers[3]), 5.0)
    assert candidate is not None and candidate.peer_id == peers[1]
    assert table.on_failure(peers[1], 6.0) is True
    assert peers[1] not in table and peers[3] in table and peers[2] not in table
    assert table.buckets()[-1].replacements[0].peer_id == peers[2]
    check_invariants(table)


def test_failures_without_replacement_evict_after_max_failures() -> None:
    table, peers = far_table(k=3)
    table.on_seen(peers[0], addr(peers[0]), 0.0)
    assert table.on_failure(peers[0], 1.0) is False
    assert table.on_failure(peers[0], 2.0) is False
    assert entry_of(table, peers[0]).failures == 2
    table.on_seen(peers[0], addr(peers[0]), 3.0)  # alive again: the count restarts
    assert entry_of(table, peers[0]).failures == 0
    for now in (4.0, 5.0):
        assert table.on_failure(peers[0], now) is False
    assert table.on_failure(peers[0], 6.0) is True
    assert peers[0] not in table
    assert table.on_failure(peers[0], 7.0) is False  # unknown peers are ignored


def test_remove_promotes_replacement_and_address_updates() -> None:
    table, peers = far_table()
    for now, peer in enumerate(peers[:4]):
        table.on_seen(peer, addr(peer), float(now))
    assert table.remove(peers[3]) is True  # a replacement
    assert table.remove(peers[0]) is True
    assert peers[2] in table  # promoted
    assert table.remove(peers[0]) is False
    table.on_seen(peers[1], addr(peers[1], port=4242), 9.0)
    assert entry_of(table, peers[1]).address.port == 4242
    with pytest.raises(ValueError, match="does not belong"):
        table.on_seen(peers[1], addr(peers[2]), 9.0)


def test_local_id_is_never_stored() -> None:
    table = RoutingTable(pid(5), k=2)
    assert table.on_seen(pid(5), addr(pid(5)), 0.0) is None
    assert len(table) == 0 and pid(5) not in table


def test_own_bucket_splits_instead_of_refusing() -> None:
    table = RoutingTable(pid(0), k=2)
    for value in (1 << 255, (1 << 255) + 1, 1, 2, 3):
        assert table.on_seen(pid(value), addr(pid(value)), 0.0) is None
    # [0, 4) split down to [0, 2) = {1} and [2, 4) = {2, 3}; the far half holds two.
    assert len(table) == 5
    assert table.on_seen(pid((1 << 255) + 2), addr(pid((1 << 255) + 2)), 1.0) is not None
    check_invariants(table)


# -- refresh ---------------------------------------------------------------------------------


def test_buckets_to_refresh() -> None:
    table = RoutingTable(pid(0), k=1)
    for value in (1 << 255, 1 << 254, 1 << 253):
        table.on_seen(pid(value), addr(pid(value)), 0.0)
    views = table.buckets()
    first = table.buckets_to_refresh(100.0, 60.0, random.Random(7))
    assert len(first) == len(views)  # never looked up
    for target, view in zip(first, views, strict=True):
        assert view.lo <= int.from_bytes(target, "big") < view.hi
    assert first == replay_targets(views, seed=7)  # deterministic for a given seed
    assert table.buckets_to_refresh(120.0, 60.0, random.Random(7)) == []
    table.mark_lookup(pid(1 << 255), 150.0)
    due = table.buckets_to_refresh(170.0, 60.0, random.Random(1))
    assert len(due) == len(views) - 1
    assert all(not int.from_bytes(t, "big") >> 255 for t in due)


def replay_targets(views: list[BucketView], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randrange(v.lo, v.hi).to_bytes(32, "big") for v in views]


# -- stateful --------------------------------------------------------------------------------


class RoutingMachine(RuleBasedStateMachine):
    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.removed: set[PeerID] = set()

    @initialize(local=ids, k=st.integers(1, 4), cache=st.integers(0, 3))
    def setup(self, local: int, k: int, cache: int) -> None:
        self.table = RoutingTable(pid(local), k=k, max_failures=2, replacement_cache_size=cache)
        self.local = local

    @rule(target=peers, specs=st.lists(peer_specs, min_size=1, max_size=8))
    def add(self, specs: list[PeerSpec]) -> MultipleResults[PeerID]:
        fresh = [pid(resolve(self.local, spec)) for spec in specs]
        for peer in fresh:
            self.seen(peer, 1.0)
        return multiple(*fresh)

    @rule(peer=peers, dt=st.floats(0, 10))
    def seen(self, peer: PeerID, dt: float) -> None:
        self.now += dt
        had_room = len(self._bucket_of(peer).entries) < self.table.k
        candidate = self.table.on_seen(peer, addr(peer), self.now)
        self.removed.discard(peer)
        if peer == self.table.local_id:
            assert candidate is None and peer not in self.table
        elif had_room or candidate is None:
            assert entry_of(self.table, peer).last_seen == self.now
        else:
            assert candidate.peer_id in self.table and peer not in self.table

    @rule(peer=peers)
    def fail(self, peer: PeerID) -> None:
        evicted = self.table.on_failure(peer, self.now)
        assert not (evicted and peer in self.table)
        if evicted:
            self.removed.add(peer)

    @rule(peer=consumes(peers))
    def remove(self, peer: PeerID) -> None:
        self.table.remove(peer)
        assert peer not in self.table
        self.removed.add(peer)

    @rule(interval=st.floats(0, 20), seed=st.integers(0, 2**32))
    def refresh(self, interval: float, seed: int) -> None:
        targets = self.table.buckets_to_refresh(self.now, interval, random.Random(seed))
        assert len(targets) <= len(self.table.buckets())
        for target in targets:
            self.table.mark_lookup(target, self.now)

    @invariant()
    def bucket_invariants(self) -> None:
        if hasattr(self, "table"):
            check_invariants(self.table)
            assert not any(e.peer_id in self.removed for e in self.table)

    def _bucket_of(self, peer: PeerID) -> BucketView:
        return next(b for b in self.table.buckets() if b.lo <= int(peer) < b.hi)


RoutingMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
test_routing_machine = RoutingMachine.TestCase
