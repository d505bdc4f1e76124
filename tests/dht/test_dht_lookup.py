"""Lookup state machine: unit rules, then simulated static networks (exactness, failures, liars).

Run with ``-s`` to see the hop/message statistics of ``test_lookup_cost_report``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.dht.lookup import Lookup, LookupMode
from distllm.dht.routing import RoutingTable
from distllm.errors import LocalProtocolError
from distllm.ids import PeerAddress, PeerID


def pid(value: int) -> PeerID:
    return PeerID(value.to_bytes(32, "big"))


def addr(peer: PeerID | int) -> PeerAddress:
    return PeerAddress(peer if isinstance(peer, PeerID) else pid(peer), "10.0.0.1", 31337)


def ids_of(addresses: tuple[PeerAddress, ...] | list[PeerAddress]) -> list[int]:
    return [int(a.peer_id) for a in addresses]


TARGET = bytes(32)  # id 0: the distance of peer n is n itself


# -- unit rules ------------------------------------------------------------------------------


def test_no_peers_is_done_at_once() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [])
    assert lookup.done and lookup.next_queries() == [] and lookup.result.closest == ()


def test_alpha_bounds_queries_in_flight_and_nearest_go_first() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [addr(n) for n in (50, 10, 40, 20, 30)], k=3, alpha=2)
    assert ids_of(lookup.next_queries()) == [10, 20]
    assert lookup.next_queries() == [] and lookup.in_flight == 2
    lookup.on_reply(pid(10), [addr(5), addr(20), addr(10)])  # known peers are not re-added
    assert ids_of(lookup.next_queries()) == [5]
    lookup.on_failure(pid(20))
    assert ids_of(lookup.next_queries()) == [30]  # 20 failed: 30 enters the shortlist
    lookup.on_reply(pid(5), [])
    lookup.on_reply(pid(30), [addr(10)])
    assert lookup.done and ids_of(lookup.result.closest) == [5, 10, 30]
    stats = lookup.stats
    assert (stats.queries, stats.replies, stats.failures, stats.hops) == (4, 3, 1, 2)


def test_never_queries_twice_nor_itself() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [addr(1), addr(2)], k=4, alpha=4, local_id=pid(3))
    assert ids_of(lookup.next_queries()) == [1, 2]
    lookup.on_reply(pid(1), [addr(2), addr(3), addr(1)])
    lookup.on_reply(pid(2), [addr(1), addr(3)])
    assert lookup.next_queries() == [] and lookup.done
    assert ids_of(lookup.result.closest) == [1, 2]


def test_replies_from_unqueried_peers_are_ignored() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [addr(8)], k=2, alpha=1)
    lookup.on_reply(pid(1), [addr(2)])  # never queried: no effect at all
    assert ids_of(lookup.next_queries()) == [8]
    lookup.on_reply(pid(8), [addr(4)])
    lookup.on_reply(pid(8), [addr(3)])  # a second reply is ignored too
    assert ids_of(lookup.next_queries()) == [4]
    lookup.on_failure(pid(4))
    lookup.on_reply(pid(4), [addr(2)])  # late reply after a failure: ignored
    assert lookup.done and ids_of(lookup.result.closest) == [8]


def test_only_first_k_peers_of_a_reply_count() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [addr(100)], k=2, alpha=1)
    lookup.next_queries()
    lookup.on_reply(pid(100), [addr(n) for n in (50, 60, 1, 2)])
    assert ids_of(lookup.next_queries()) == [50]


def test_find_value_stops_at_quorum_and_reports_where_to_cache() -> None:
    lookup: Lookup[bytes] = Lookup(
        TARGET, [addr(n) for n in (4, 3, 2, 1)], k=4, alpha=4, mode=LookupMode.FIND_VALUE
    )
    lookup.next_queries()
    lookup.on_reply(pid(3), [])
    lookup.on_reply(pid(1), [])
    assert not lookup.done
    lookup.on_reply(pid(4), [], b"v")
    assert lookup.done and lookup.next_queries() == []
    result = lookup.result
    assert result.values == ((pid(4), b"v"),)
    assert ids_of(result.without_value) == [1, 3]
    assert ids_of(result.closest) == [1, 3, 4]


def test_find_value_without_quorum_merges_every_responder() -> None:
    lookup: Lookup[bytes] = Lookup(
        TARGET, [addr(1), addr(2)], k=2, mode=LookupMode.FIND_VALUE, quorum=None
    )
    lookup.next_queries()
    lookup.on_reply(pid(2), [], b"b")
    assert not lookup.done
    lookup.on_reply(pid(1), [], b"a")
    assert lookup.done and lookup.result.values == ((pid(2), b"b"), (pid(1), b"a"))


def test_misuse() -> None:
    lookup: Lookup[bytes] = Lookup(TARGET, [addr(1)])
    lookup.next_queries()
    with pytest.raises(LocalProtocolError):
        lookup.on_reply(pid(1), [], b"value")
    with pytest.raises(ValueError, match="target must be 32 bytes"):
        Lookup(b"short", [])
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        Lookup(TARGET, [], alpha=0)
    with pytest.raises(ValueError, match="quorum must be >= 1 or None"):
        Lookup(TARGET, [], quorum=0, mode=LookupMode.FIND_VALUE)


# -- simulated networks ----------------------------------------------------------------------


@dataclass
class Network:
    """Static swarm: every node's table learned every other node in its own random order."""

    peers: list[PeerID]
    k: int
    tables: dict[PeerID, RoutingTable] = field(default_factory=dict)
    dead: set[PeerID] = field(default_factory=set)  # every query to them fails
    liars: set[PeerID] = field(default_factory=set)  # answer with fake peers near the target
    fakes: set[PeerID] = field(default_factory=set)  # ids liars made up (they do not exist)
    origin: PeerID | None = None  # the node running the current lookup

    @classmethod
    def build(cls, n: int, k: int, rng: random.Random) -> Network:
        peers = list(dict.fromkeys(PeerID(rng.randbytes(32)) for _ in range(n)))  # ordered
        net = cls(peers, k)
        for peer in peers:
            table = RoutingTable(peer, k=k)
            order = peers[:]
            rng.shuffle(order)
            for other in order:
                table.on_seen(other, addr(other), 0.0)  # full buckets keep the first arrivals
            net.tables[peer] = table
        return net

    def answer(self, lookup: Lookup[bytes], peer: PeerID) -> None:
        if peer in self.dead or peer not in self.tables:  # dead, or a fake: cannot answer
            lookup.on_failure(peer)
        elif peer in self.liars:
            goal = int.from_bytes(lookup.target, "big")
            fakes = [pid(goal ^ (1 + i + 1000 * len(self.fakes))) for i in range(self.k)]
            self.fakes.update(fakes)
            lookup.on_reply(peer, [addr(f) for f in fakes])
        else:
            # A FIND_NODE handler leaves out the requester: it knows itself.
            nearest = self.tables[peer].nearest(lookup.target, self.k, exclude=self.origin)
            lookup.on_reply(peer, [e.address for e in nearest])

    def lookup(
        self, origin: PeerID, target: bytes, alpha: int, rng: random.Random
    ) -> Lookup[bytes]:
        self.origin = origin
        initial = [e.address for e in self.tables[origin].nearest(target, self.k)]
        lookup: Lookup[bytes] = Lookup(target, initial, k=self.k, alpha=alpha, local_id=origin)
        in_flight: list[PeerAddress] = []
        while not lookup.done:
            in_flight += lookup.next_queries()
            assert in_flight, "not done, yet nothing to wait for"
            assert len(in_flight) <= alpha
            query = in_flight.pop(rng.randrange(len(in_flight)))  # replies arrive in any order
            self.answer(lookup, query.peer_id)
        return lookup

    def true_closest(self, target: bytes, origin: PeerID) -> list[int]:
        goal = int.from_bytes(target, "big")
        others = [int(p) for p in self.peers if p != origin]
        return sorted(others, key=lambda v: v ^ goal)[: self.k]


def random_target(net: Network, rng: random.Random) -> bytes:
    # Half the time an existing node's id (its owner must come first), else a random point.
    return rng.choice(net.peers).digest if rng.random() < 0.5 else rng.randbytes(32)


@given(
    n=st.integers(1, 80),
    k=st.integers(1, 8),
    alpha=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=150, deadline=None)
def test_lookup_finds_exactly_the_k_closest(n: int, k: int, alpha: int, seed: int) -> None:
    rng = random.Random(seed)
    net = Network.build(n, k, rng)
    for _ in range(3):
        origin = rng.choice(net.peers)
        target = random_target(net, rng)
        lookup = net.lookup(origin, target, alpha, rng)
        assert ids_of(lookup.result.closest) == net.true_closest(target, origin)
        assert lookup.stats.queries <= len(net.peers) - 1


@given(
    n=st.integers(2, 80),
    k=st.integers(1, 8),
    alpha=st.integers(1, 4),
    dead_share=st.floats(0.0, 0.9),
    liar_share=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=40, deadline=None)
def test_lookup_with_dead_and_lying_nodes_terminates_with_real_live_responders(
    n: int, k: int, alpha: int, dead_share: float, liar_share: float, seed: int
) -> None:
    rng = random.Random(seed)
    net = Network.build(n, k, rng)
    origin = net.peers[0]
    others = net.peers[1:]
    net.dead = set(rng.sample(others, int(dead_share * len(others))))
    net.liars = set(rng.sample(others, int(liar_share * len(others)))) - net.dead
    for _ in range(3):
        lookup = net.lookup(origin, random_target(net, rng), alpha, rng)
        closest = [a.peer_id for a in lookup.result.closest]
        assert len(closest) <= k
        assert not set(closest) & (net.dead | net.fakes)
        assert set(closest) <= set(net.tables)
        # Each real peer and each fake named in a reply is queried at most once.
        assert lookup.stats.queries <= len(others) + len(net.fakes)


def test_lying_node_cannot_hide_or_replace_the_honest_result() -> None:
    rng = random.Random(2024)
    net = Network.build(128, 8, rng)
    net.liars = set(rng.sample(net.peers, 6))
    honest = [p for p in net.peers if p not in net.liars]
    for _ in range(10):
        origin = rng.choice(honest)
        target = rng.randbytes(32)
        lookup = net.lookup(origin, target, 3, rng)
        assert ids_of(lookup.result.closest) == net.true_closest(target, origin)


def test_lookup_cost_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Average messages (queries) and hops per lookup, k=20, alpha=3; printed for benchmarks.

    The tables are complete (every node met every other), so these are best cases; with 20 %
    of the nodes dead (still in the tables), recall is the share of the true k closest *live*
    nodes found.
    """
    rng = random.Random(7)
    runs = 25
    lines = [f"lookup cost, k=20 alpha=3, {runs} lookups per row (random static networks):"]
    for n in (64, 128, 256, 512):
        net = Network.build(n, 20, rng)
        for dead_share in (0.0, 0.2):
            net.dead = set(rng.sample(net.peers, int(dead_share * n)))
            live = [p for p in net.peers if p not in net.dead]
            queries = hops = found = 0
            for _ in range(runs):
                origin = rng.choice(live)
                target = rng.randbytes(32)
                lookup = net.lookup(origin, target, 3, rng)
                queries += lookup.stats.queries
                hops += lookup.stats.hops
                goal = int.from_bytes(target, "big")
                best = sorted((int(p) for p in live if p != origin), key=lambda v: v ^ goal)
                found += len(set(ids_of(lookup.result.closest)) & set(best[:20]))
            recall = found / (20 * runs)
            if not dead_share:
                assert recall == 1.0
            assert queries / runs < 3 * 20  # far below "ask everyone"
            lines.append(
                f"  N={n:4d} dead={dead_share:3.0%}: {queries / runs:5.1f} messages, "
                f"{hops / runs:4.2f} hops, recall {recall:.3f}"
            )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
