"""Routes of whole spans: optimal vs brute force, errors, and forward load spreading."""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swarm_views import IDS, Spec, make_view

from distllm.client.errors import NoRouteError
from distllm.client.planner import DEFAULT_COSTS, RouteHop
from distllm.client.routes import MisalignedSpansError, plan_forward_route, plan_session_route
from distllm.client.swarm import SwarmView


def session_cost(view: SwarmView, route: Sequence[RouteHop], needed: int) -> float:
    total = 0.0
    for hop in route:
        server = view.servers[hop.peer]
        total += view.rtt(hop.peer) / 2 + DEFAULT_COSTS.hop_overhead
        if server.free_cache_tokens < needed:
            total += DEFAULT_COSTS.cache_penalty
        total += (server.end - server.start) / max(server.inference_rps, 1e-6)
    return total


def chains(view: SwarmView, start: int, end: int, banned: set[object]) -> Iterator[list[RouteHop]]:
    """Every chain of whole, unbanned spans from ``start`` to ``end`` (brute force)."""
    if start == end:
        yield []
        return
    for server in view.servers.values():
        if server.peer in banned or server.start != start or server.end > end:
            continue
        hop = RouteHop(server.peer, server.address, server.start, server.end)
        for rest in chains(view, server.end, end, banned):
            yield [hop, *rest]


spans = st.tuples(st.integers(0, 5), st.integers(1, 6)).filter(lambda s: s[0] < s[1])
specs = st.lists(
    st.builds(
        Spec,
        who=st.integers(0, 7),
        start=st.just(0),
        end=st.just(1),
        inference_rps=st.sampled_from([0.0, 1.0, 5.0, 20.0]),
        free_cache_tokens=st.sampled_from([0, 100, 5000]),
        rtt=st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.2])),
    ),
    max_size=7,
    unique_by=lambda s: s.who,
)


@settings(max_examples=200, deadline=None)
@given(
    specs=specs,
    layout=st.lists(spans, min_size=8, max_size=8),
    banned=st.sets(st.integers(0, 7), max_size=3),
    needed=st.sampled_from([50, 1000]),
)
def test_session_route_is_optimal_against_brute_force(specs, layout, banned, needed):
    specs = [Spec(s.who, *layout[s.who], s.inference_rps, 1000.0, s.free_cache_tokens, s.rtt)
             for s in specs]  # fmt: skip
    view = make_view(6, specs)
    banned_peers = {IDS[i].peer_id for i in banned}
    options = list(chains(view, 0, 6, banned_peers))
    if not options:
        with pytest.raises(NoRouteError):
            plan_session_route(view, 0, 6, banned=banned_peers, cache_tokens_needed=needed)
        return
    route = plan_session_route(view, 0, 6, banned=banned_peers, cache_tokens_needed=needed)
    assert [hop.start for hop in route] == [0, *(hop.end for hop in route[:-1])]
    assert route[-1].end == 6 and not {hop.peer for hop in route} & banned_peers
    best = min((session_cost(view, c, needed), len(c)) for c in options)
    got = (session_cost(view, route, needed), len(route))
    assert math.isclose(got[0], best[0], rel_tol=1e-9, abs_tol=1e-12) and got[1] == best[1]


def test_errors_name_the_blocks_and_tell_holes_from_misaligned_spans():
    view = make_view(6, [Spec(0, 0, 2), Spec(1, 3, 6)])
    with pytest.raises(NoRouteError, match=r"no server holds block 2 of model 'tiny-llama'"):
        plan_session_route(view, 0, 6, banned=set(), cache_tokens_needed=1)
    view = make_view(6, [Spec(0, 0, 3), Spec(1, 2, 6), Spec(2, 4, 6)])
    with pytest.raises(MisalignedSpansError, match="do not chain through block 3") as caught:
        plan_session_route(view, 0, 6, banned=set(), cache_tokens_needed=1)
    assert caught.value.blocks == (3, 4, 5)
    with pytest.raises(NoRouteError) as banned:
        plan_session_route(view, 0, 6, banned={IDS[0].peer_id}, cache_tokens_needed=1)
    assert banned.value.blocks == (0, 1) and banned.value.banned == 1


def test_a_sub_range_routes_only_through_spans_inside_it():
    view = make_view(6, [Spec(0, 0, 6), Spec(1, 2, 4), Spec(2, 4, 6)])
    route = plan_session_route(view, 2, 6, banned=set(), cache_tokens_needed=1)
    assert [(h.peer, h.start, h.end) for h in route] == [
        (IDS[1].peer_id, 2, 4),
        (IDS[2].peer_id, 4, 6),
    ]


def test_forward_routes_spread_load_by_throughput():
    view = make_view(4, [Spec(0, 0, 4, forward_rps=100.0), Spec(1, 0, 4, forward_rps=300.0)])
    rng = random.Random(0)
    counts = collections.Counter(
        plan_forward_route(view, 0, 4, banned=set(), rng=rng)[0].peer for _ in range(2000)
    )
    assert 0.7 < counts[IDS[1].peer_id] / 2000 < 0.8  # 300 / (100 + 300)


def test_routes_for_an_adapter_use_only_servers_that_announce_it():
    view = make_view(
        4,
        [
            Spec(0, 0, 4, inference_rps=1000.0, forward_rps=1e6),  # fastest, plain only
            Spec(1, 0, 2, adapters=("a",)),
            Spec(2, 2, 4, adapters=("a", "b")),
            Spec(3, 2, 4, adapters=("b",)),
        ],
    )
    rng = random.Random(0)
    a_route = [IDS[1].peer_id, IDS[2].peer_id]
    assert [
        h.peer for h in plan_session_route(view, 0, 4, banned=set(), cache_tokens_needed=1)
    ] == [IDS[0].peer_id]
    session = plan_session_route(view, 0, 4, banned=set(), cache_tokens_needed=1, adapter="a")
    assert [h.peer for h in session] == a_route
    for _ in range(20):
        route = plan_forward_route(view, 0, 4, banned=set(), rng=rng, adapter="a")
        assert [h.peer for h in route] == a_route
    (hop,) = plan_forward_route(view, 2, 4, banned=set(), rng=rng, adapter="b")
    assert hop.peer in {IDS[2].peer_id, IDS[3].peer_id}
    with pytest.raises(NoRouteError, match=r"blocks 0, 1 of model 'tiny-llama' with adapter 'b'"):
        plan_forward_route(view, 0, 4, banned=set(), rng=rng, adapter="b")
    with pytest.raises(NoRouteError, match="with adapter 'c'") as caught:
        plan_session_route(view, 0, 4, banned=set(), cache_tokens_needed=1, adapter="c")
    assert caught.value.blocks == (0, 1, 2, 3) and caught.value.banned == 0
    # Banned holders of the adapter are counted; plain servers are not.
    with pytest.raises(NoRouteError, match=r"with adapter 'a' \(banned: 1 peer\)") as caught:
        plan_session_route(view, 0, 4, banned={IDS[1].peer_id}, cache_tokens_needed=1, adapter="a")
    assert caught.value.blocks == (0, 1)
