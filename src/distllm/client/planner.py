"""Routes through the swarm: which servers compute which blocks (pure, deterministic).

A route is a list of :class:`RouteHop` whose spans are contiguous and cover the requested range
``[start, end)`` exactly; a hop may use any sub-span of what its server holds.

**Inference** (:func:`plan_inference`) minimises the expected time of one decode step. Entering
a server costs ``rtt / 2 + hop_overhead`` (one network leg, measured from the client, plus
serialisation and scheduling); every block computed there costs ``1 / inference_rps`` (its
announced per-block decode rate). A server whose ``free_cache_tokens`` is below what the session
needs costs ``cache_penalty`` more per hop: it may refuse the session, so any route avoiding it
wins, but a route through it beats no route. Banned peers are excluded.

The search is Dijkstra over nodes (boundary ``i``, server ``S``) — "the activations after block
``i - 1``, inside ``S``" — plus one node per boundary between servers. Steps: enter ``S`` at
``i`` (``S`` holds block ``i``), compute block ``i`` in ``S`` (to ``(i + 1, S)``), leave ``S``
(free). Costs are ordered as ``(seconds, hops)``, so of equally fast routes the one with fewer
hops wins, and the remaining ties follow peer id order: the same view always gives the same
route.

**Forward/backward** (:func:`plan_forward`) has no session to keep and should spread load: the
same search, with each server's per-block time drawn from an exponential distribution of mean
``1 / forward_rps`` (times ``num_tokens``). This is an exponential race: among servers offering
the same blocks at the same RTT, ``S`` wins with probability ``forward_rps(S) / sum(forward_rps)``
— a random choice weighted by throughput — while multi-hop routes still favour fast servers,
near ones and few hops (hop costs are as for inference; the cache does not matter).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Sequence, Set
from dataclasses import dataclass

from distllm.client.errors import NoRouteError
from distllm.client.swarm import ServerInfo, SwarmView
from distllm.ids import PeerAddress, PeerID

__all__ = [
    "DEFAULT_COSTS",
    "RouteCosts",
    "RouteHop",
    "inference_cost",
    "plan_forward",
    "plan_inference",
    "plan_replacement",
]

#: Per-block rate assumed for a server announcing 0 (not measured): a last resort, not a hole.
_MIN_RATE = 1e-6


@dataclass(frozen=True, slots=True)
class RouteCosts:
    """Tunable terms of the cost model (seconds)."""

    hop_overhead: float = 0.01  # per server entered: serialisation, scheduling; >= 0
    cache_penalty: float = 1000.0  # per hop on a server short of cache; >= 0, dwarfs real costs

    def __post_init__(self) -> None:
        for name in ("hop_overhead", "cache_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


DEFAULT_COSTS = RouteCosts()


@dataclass(frozen=True, slots=True)
class RouteHop:
    """Blocks ``[start, end)`` computed by ``peer``, dialled at ``address``."""

    peer: PeerID
    address: PeerAddress  # an address of peer
    start: int  # 0 <= start < end, within what peer announced
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"a hop spans 0 <= start < end, got [{self.start}, {self.end})")


def plan_inference(
    view: SwarmView,
    start: int,
    end: int,
    *,
    banned: Set[PeerID],
    cache_tokens_needed: int,
    costs: RouteCosts = DEFAULT_COSTS,
) -> list[RouteHop]:
    """The fastest route for decoding through blocks ``[start, end)`` (see the module doc).

    Also re-plans a failed part of a session's route: pass that part's range and the bans.
    Raises :class:`NoRouteError` if some block of the range has no unbanned server.
    """
    servers = _candidates(view, start, end, banned)
    enter = [
        _enter_cost(view, s, costs) + _cache_cost(s, cache_tokens_needed, costs) for s in servers
    ]
    per_block = [1.0 / max(s.inference_rps, _MIN_RATE) for s in servers]
    return _shortest_route(servers, start, end, enter, per_block)


def plan_replacement(
    view: SwarmView,
    route: Sequence[RouteHop],
    failed_index: int,
    *,
    banned: Set[PeerID],
    cache_tokens_needed: int,
    costs: RouteCosts = DEFAULT_COSTS,
) -> list[RouteHop]:
    """``route`` with hop ``failed_index`` replaced by a fresh plan for its blocks.

    The failed peer is excluded even if ``banned`` does not list it yet; the other hops stay as
    they are (their servers keep their caches). The new part may take several hops.
    """
    failed = route[failed_index]
    part = plan_inference(
        view,
        failed.start,
        failed.end,
        banned=banned | {failed.peer},
        cache_tokens_needed=cache_tokens_needed,
        costs=costs,
    )
    return [*route[:failed_index], *part, *route[failed_index + 1 :]]


def plan_forward(
    view: SwarmView,
    start: int,
    end: int,
    *,
    banned: Set[PeerID],
    rng: random.Random,
    num_tokens: int = 1,
    costs: RouteCosts = DEFAULT_COSTS,
) -> list[RouteHop]:
    """A throughput-weighted random route for a stateless forward/backward of ``num_tokens``
    tokens (batch x length) through ``[start, end)`` (see the module doc)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens!r}")
    servers = _candidates(view, start, end, banned)
    enter = [_enter_cost(view, s, costs) for s in servers]
    # One draw per server, in peer id order: the same rng state gives the same route.
    per_block = [num_tokens * rng.expovariate(max(s.forward_rps, _MIN_RATE)) for s in servers]
    return _shortest_route(servers, start, end, enter, per_block)


def inference_cost(
    view: SwarmView,
    route: Sequence[RouteHop],
    *,
    cache_tokens_needed: int,
    costs: RouteCosts = DEFAULT_COSTS,
) -> float:
    """The cost :func:`plan_inference` assigns to ``route`` (every hop's server must be in
    ``view``): an estimate of one decode step's seconds, plus penalties."""
    total = 0.0
    for hop in route:
        server = view.servers[hop.peer]
        total += _enter_cost(view, server, costs) + _cache_cost(server, cache_tokens_needed, costs)
        total += (hop.end - hop.start) / max(server.inference_rps, _MIN_RATE)
    return total


# -- internals ---------------------------------------------------------------------------------


def _enter_cost(view: SwarmView, server: ServerInfo, costs: RouteCosts) -> float:
    return view.rtt(server.peer) / 2 + costs.hop_overhead


def _cache_cost(server: ServerInfo, needed: int, costs: RouteCosts) -> float:
    return costs.cache_penalty if server.free_cache_tokens < needed else 0.0


def _candidates(view: SwarmView, start: int, end: int, banned: Set[PeerID]) -> list[ServerInfo]:
    """Unbanned servers holding some block of ``[start, end)``, in peer id order; raises
    :class:`NoRouteError` if they leave a block uncovered (a route exists iff none is: a hop
    may enter and leave a server anywhere within its span)."""
    if not (
        isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= view.num_blocks
    ):
        raise ValueError(f"range [{start}, {end}) is not within 0..{view.num_blocks} or empty")
    missing = view.uncovered_blocks(start, end, excluding=banned)
    if missing:
        holders = {s.peer for b in missing for s in view.servers_for_block(b)}
        raise NoRouteError(view.model, missing, banned=len(holders))  # all of them are banned
    return [
        s for s in view.servers.values() if s.peer not in banned and s.start < end and start < s.end
    ]


_Node = tuple[int, int]  # (boundary i, index of the server in the candidates; -1: between servers)


def _shortest_route(
    servers: Sequence[ServerInfo],
    start: int,
    end: int,
    enter: Sequence[float],
    per_block: Sequence[float],
) -> list[RouteHop]:
    """Dijkstra from (start, -1) to (end, -1); every block of the range must be covered."""
    entering: list[list[int]] = [[] for _ in range(start, end)]  # by boundary - start
    for k, server in enumerate(servers):
        for i in range(max(start, server.start), min(end, server.end)):
            entering[i - start].append(k)
    best: dict[_Node, tuple[float, int]] = {(start, -1): (0.0, 0)}
    came_from: dict[_Node, _Node] = {}
    done: set[_Node] = set()
    heap: list[tuple[float, int, int, int]] = [(0.0, 0, start, -1)]

    def relax(node: _Node, via: _Node, seconds: float, hops: int) -> None:
        if (seconds, hops) < best.get(node, (math.inf, 0)):
            best[node] = (seconds, hops)
            came_from[node] = via
            heapq.heappush(heap, (seconds, hops, *node))

    while heap:
        seconds, hops, i, k = heapq.heappop(heap)
        node = (i, k)
        if node in done:
            continue  # a stale heap item
        done.add(node)
        if node == (end, -1):
            break
        if k < 0:
            if i < end:
                for k2 in entering[i - start]:
                    relax((i, k2), node, seconds + enter[k2], hops + 1)
        else:
            relax((i, -1), node, seconds, hops)  # leave the server
            if i < min(servers[k].end, end):
                relax((i + 1, k), node, seconds + per_block[k], hops)
    return _hops(servers, _path(came_from, start, end))


def _path(came_from: dict[_Node, _Node], start: int, end: int) -> list[_Node]:
    path = [(end, -1)]
    while path[-1] != (start, -1):
        path.append(came_from[path[-1]])
    path.reverse()
    return path


def _hops(servers: Sequence[ServerInfo], path: list[_Node]) -> list[RouteHop]:
    """Cut a node path into hops: one per stretch spent inside a server."""
    route: list[RouteHop] = []
    entered_at = 0
    for (_, k), (j, k2) in itertools.pairwise(path):
        if k < 0 <= k2:
            entered_at = j
        elif k2 < 0 <= k:
            server = servers[k]
            route.append(RouteHop(server.peer, server.address, entered_at, j))
    return route
