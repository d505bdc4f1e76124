"""Route planning: optimal vs brute force on small swarms, NoRouteError, load spreading."""

from __future__ import annotations

import collections
import itertools
import math
import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from swarm_views import Spec, make_view, peer

from distllm.client.errors import NoRouteError
from distllm.client.planner import (
    RouteCosts,
    RouteHop,
    inference_cost,
    plan_forward,
    plan_inference,
    plan_replacement,
)
from distllm.client.swarm import ServerInfo, SwarmView
from distllm.ids import PeerID


def spans(route: Sequence[RouteHop]) -> list[tuple[PeerID, int, int]]:
    return [(hop.peer, hop.start, hop.end) for hop in route]


def check_valid(
    view: SwarmView, route: Sequence[RouteHop], start: int, end: int, banned: set[PeerID]
) -> None:
    assert route, "a route is never empty"
    assert route[0].start == start
    assert route[-1].end == end
    for hop, after in itertools.pairwise(route):
        assert hop.end == after.start
    for hop in route:
        server = view.servers[hop.peer]
        assert server.start <= hop.start < hop.end <= server.end
        assert hop.peer not in banned
        assert hop.address == server.address


# -- the brute-force oracle ------------------------------------------------------------------


def all_routes(
    servers: Sequence[ServerInfo], start: int, end: int
) -> Iterator[list[tuple[ServerInfo, int, int]]]:
    """Every decomposition of [start, end) into contiguous pieces, each on a server holding it."""
    if start == end:
        yield []
        return
    for server in servers:
        if server.start <= start < server.end:
            for cut in range(start + 1, min(server.end, end) + 1):
                for rest in all_routes(servers, cut, end):
                    yield [(server, start, cut), *rest]


def oracle_cost(
    view: SwarmView, pieces: Sequence[tuple[ServerInfo, int, int]], needed: int, costs: RouteCosts
) -> float:
    """The documented cost model, written independently of the planner."""
    total = 0.0
    for server, a, b in pieces:
        total += view.rtt(server.peer) / 2 + costs.hop_overhead
        if server.free_cache_tokens < needed:
            total += costs.cache_penalty
        total += (b - a) / server.inference_rps
    return total


# -- swarms ----------------------------------------------------------------------------------


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, list[Spec]]:
    num_blocks = draw(st.integers(1, 6))
    specs = []
    for who in range(draw(st.integers(0, 5))):
        start = draw(st.integers(0, num_blocks - 1))
        end = draw(st.integers(start + 1, num_blocks))
        # Few distinct values on purpose: equal-cost routes (ties) must come up.
        rps = draw(st.sampled_from([1.0, 2.0, 5.0, 10.0]) | st.floats(0.5, 100.0))
        cache = draw(st.sampled_from([0, 100, 4096]))
        rtt = draw(st.none() | st.sampled_from([0.0, 0.02, 0.1]) | st.floats(0.0, 0.5))
        specs.append(Spec(who, start, end, rps, rps * 50, cache, rtt))
    return num_blocks, specs


@given(swarm=swarms(), data=st.data())
@settings(max_examples=500, deadline=None)
def test_inference_route_is_optimal_vs_brute_force(
    swarm: tuple[int, list[Spec]], data: st.DataObject
) -> None:
    num_blocks, specs = swarm
    view = make_view(num_blocks, specs)
    start = data.draw(st.integers(0, num_blocks - 1))
    end = data.draw(st.integers(start + 1, num_blocks))
    banned = {peer(s.who) for s in specs if data.draw(st.booleans(), label=f"ban {s.who}")}
    needed = data.draw(st.sampled_from([0, 100, 1000]))
    costs = RouteCosts(
        hop_overhead=data.draw(st.sampled_from([0.0, 0.01, 0.05])),
        cache_penalty=data.draw(st.sampled_from([0.0, 1000.0])),
    )
    allowed = [s for s in view.servers.values() if s.peer not in banned]
    best = min(
        (oracle_cost(view, r, needed, costs) for r in all_routes(allowed, start, end)),
        default=None,
    )

    def plan() -> list[RouteHop]:
        return plan_inference(
            view, start, end, banned=banned, cache_tokens_needed=needed, costs=costs
        )

    event("no route" if best is None else "route")
    if best is None:
        with pytest.raises(NoRouteError) as caught:
            plan()
        held = {b for s in allowed for b in range(s.start, s.end)}
        assert caught.value.blocks == tuple(b for b in range(start, end) if b not in held)
        return
    route = plan()
    check_valid(view, route, start, end, banned)
    pieces = [(view.servers[h.peer], h.start, h.end) for h in route]
    cost = inference_cost(view, route, cache_tokens_needed=needed, costs=costs)
    assert math.isclose(cost, oracle_cost(view, pieces, needed, costs), rel_tol=1e-9)
    assert math.isclose(cost, best, rel_tol=1e-9, abs_tol=1e-12)
    assert all(a.peer != b.peer for a, b in itertools.pairwise(route))
    assert plan() == route  # deterministic


def test_cost_model_by_hand() -> None:
    view = make_view(
        4,
        [
            Spec(0, 0, 4, inference_rps=10.0, rtt=0.2),  # 0.1 + 0.01 + 4 * 0.1 = 0.51
            Spec(1, 0, 2, inference_rps=100.0, rtt=0.02),  # 0.01 + 0.01 + 2 * 0.01 = 0.04
            Spec(2, 2, 4, inference_rps=100.0),  # unmeasured: 0.075 + 0.01 + 0.02 = 0.105
        ],
    )
    route = plan_inference(view, 0, 4, banned=set(), cache_tokens_needed=0)
    assert spans(route) == [(peer(1), 0, 2), (peer(2), 2, 4)]
    assert inference_cost(view, route, cache_tokens_needed=0) == pytest.approx(0.145)
    # Without peer 2: peer 1 then peer 0 (0.04 + 0.31) beats peer 0 alone (0.51).
    route = plan_inference(view, 0, 4, banned={peer(2)}, cache_tokens_needed=0)
    assert spans(route) == [(peer(1), 0, 2), (peer(0), 2, 4)]


def test_short_of_cache_is_a_last_resort_not_an_exclusion() -> None:
    view = make_view(
        2,
        [Spec(0, 0, 2, inference_rps=1000.0, free_cache_tokens=10), Spec(1, 0, 2, 1.0)],
    )
    route = plan_inference(view, 0, 2, banned=set(), cache_tokens_needed=100)
    assert spans(route) == [(peer(1), 0, 2)]  # slow but has room
    route = plan_inference(view, 0, 2, banned={peer(1)}, cache_tokens_needed=100)
    assert spans(route) == [(peer(0), 0, 2)]  # short of cache, but the only one left


def test_equal_costs_prefer_fewer_hops_and_are_deterministic() -> None:
    free = RouteCosts(hop_overhead=0.0)
    # Whatever the peer id order, one hop on `a` beats `b` then `c` at equal cost.
    for a, b, c in itertools.permutations(range(3)):
        specs = [Spec(a, 0, 4, rtt=0.0), Spec(b, 0, 2, rtt=0.0), Spec(c, 2, 4, rtt=0.0)]
        view = make_view(4, specs)
        route = plan_inference(view, 0, 4, banned=set(), cache_tokens_needed=0, costs=free)
        assert spans(route) == [(peer(a), 0, 4)]
    twins = make_view(2, [Spec(3, 0, 2), Spec(4, 0, 2)])
    first = min(peer(3), peer(4))
    for _ in range(3):
        assert plan_inference(twins, 0, 2, banned=set(), cache_tokens_needed=0)[0].peer == first


def test_no_route_names_the_uncovered_blocks() -> None:
    view = make_view(6, [Spec(0, 0, 3), Spec(1, 3, 5), Spec(2, 3, 4)])
    with pytest.raises(NoRouteError) as caught:
        plan_inference(view, 0, 6, banned={peer(1)}, cache_tokens_needed=0)
    assert caught.value.blocks == (4, 5)
    assert caught.value.banned == 1
    assert str(caught.value) == "no server holds blocks 4, 5 of model 'tiny-llama' (banned: 1 peer)"
    with pytest.raises(NoRouteError, match=r"^no server holds block 5 of model 'tiny-llama'$"):
        plan_inference(view, 0, 6, banned=set(), cache_tokens_needed=0)
    empty = make_view(40, [])
    with pytest.raises(NoRouteError, match=r"blocks 0\.\.39 of"):
        plan_forward(empty, 0, 40, banned=set(), rng=random.Random(0))
    assert str(NoRouteError("m", [1, 2, 3, 5, 7, 8], banned=2)) == (
        "no server holds blocks 1..3, 5, 7, 8 of model 'm' (banned: 2 peers)"
    )


def test_bad_ranges() -> None:
    view = make_view(4, [Spec(0, 0, 4)])
    for start, end in [(2, 2), (3, 1), (-1, 2), (0, 5)]:
        with pytest.raises(ValueError, match="range"):
            plan_inference(view, start, end, banned=set(), cache_tokens_needed=0)
    with pytest.raises(ValueError, match="num_tokens"):
        plan_forward(view, 0, 4, banned=set(), rng=random.Random(0), num_tokens=0)
    with pytest.raises(ValueError, match="hop_overhead"):
        RouteCosts(hop_overhead=-1.0)


def test_replacement_replans_only_the_failed_hop() -> None:
    view = make_view(
        6,
        [
            Spec(0, 0, 2, rtt=0.01),
            Spec(1, 2, 4, rtt=0.01),
            Spec(2, 4, 6, rtt=0.01),
            Spec(3, 2, 3, rtt=0.3),  # the failed span may need several servers
            Spec(4, 3, 4, rtt=0.3),
            Spec(5, 0, 6, inference_rps=0.1),  # could replace everything, but far too slow
        ],
    )
    route = plan_inference(view, 0, 6, banned=set(), cache_tokens_needed=0)
    assert spans(route) == [(peer(0), 0, 2), (peer(1), 2, 4), (peer(2), 4, 6)]
    # The failed peer is excluded even before the ban list knows it.
    new = plan_replacement(view, route, 1, banned=set(), cache_tokens_needed=0)
    assert spans(new) == [(peer(0), 0, 2), (peer(3), 2, 3), (peer(4), 3, 4), (peer(2), 4, 6)]
    new = plan_replacement(view, route, 1, banned={peer(3), peer(4)}, cache_tokens_needed=0)
    assert spans(new) == [(peer(0), 0, 2), (peer(5), 2, 4), (peer(2), 4, 6)]
    with pytest.raises(NoRouteError) as caught:
        plan_replacement(view, route, 1, banned={peer(3), peer(5)}, cache_tokens_needed=0)
    assert caught.value.blocks == (2,)


def test_zero_rate_servers_are_a_last_resort() -> None:
    view = make_view(2, [Spec(0, 0, 2, inference_rps=0.0, forward_rps=0.0), Spec(1, 1, 2)])
    route = plan_inference(view, 0, 2, banned=set(), cache_tokens_needed=0)
    assert spans(route) == [(peer(0), 0, 1), (peer(1), 1, 2)]
    route = plan_forward(view, 0, 2, banned=set(), rng=random.Random(1))
    check_valid(view, route, 0, 2, set())


# -- forward / backward ----------------------------------------------------------------------


@given(swarm=swarms(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_forward_routes_are_valid_and_respect_bans(
    swarm: tuple[int, list[Spec]], data: st.DataObject
) -> None:
    num_blocks, specs = swarm
    view = make_view(num_blocks, specs)
    start = data.draw(st.integers(0, num_blocks - 1))
    end = data.draw(st.integers(start + 1, num_blocks))
    banned = {peer(s.who) for s in specs if data.draw(st.booleans(), label=f"ban {s.who}")}
    seed = data.draw(st.integers(0, 2**32))
    tokens = data.draw(st.sampled_from([1, 512]))
    missing = view.uncovered_blocks(start, end, excluding=banned)
    event("no route" if missing else "route")
    if missing:
        with pytest.raises(NoRouteError) as caught:
            plan_forward(view, start, end, banned=banned, rng=random.Random(seed))
        assert list(caught.value.blocks) == missing
        return
    route = plan_forward(
        view, start, end, banned=banned, rng=random.Random(seed), num_tokens=tokens
    )
    check_valid(view, route, start, end, banned)
    again = plan_forward(
        view, start, end, banned=banned, rng=random.Random(seed), num_tokens=tokens
    )
    assert again == route


def test_forward_spreads_load_across_equal_servers() -> None:
    view = make_view(4, [Spec(i, 0, 4) for i in range(3)])
    rng = random.Random(1234)
    counts = collections.Counter(
        plan_forward(view, 0, 4, banned=set(), rng=rng, num_tokens=512)[0].peer for _ in range(3000)
    )
    assert set(counts) == {peer(0), peer(1), peer(2)}
    assert all(850 <= n <= 1150 for n in counts.values()), counts  # 1000 expected, sd ~26


def test_forward_weights_by_throughput() -> None:
    view = make_view(2, [Spec(0, 0, 2, forward_rps=300.0), Spec(1, 0, 2, forward_rps=100.0)])
    rng = random.Random(99)
    counts = collections.Counter(
        plan_forward(view, 0, 2, banned=set(), rng=rng, num_tokens=512)[0].peer for _ in range(4000)
    )
    assert 0.71 <= counts[peer(0)] / 4000 <= 0.79, counts  # 3 / (3 + 1) expected
    # Banned peers never appear.
    for seed in range(200):
        route = plan_forward(view, 0, 2, banned={peer(0)}, rng=random.Random(seed))
        assert spans(route) == [(peer(1), 0, 2)]


def test_forward_prefers_few_hops_for_small_batches() -> None:
    # Splitting costs an extra hop (10 ms + RTT/2) for no gain in compute.
    view = make_view(4, [Spec(0, 0, 4, rtt=0.01), Spec(1, 0, 2, rtt=0.01), Spec(2, 2, 4, rtt=0.01)])
    counts = collections.Counter(
        len(plan_forward(view, 0, 4, banned=set(), rng=random.Random(seed))) for seed in range(500)
    )
    assert counts[1] > 450, counts
