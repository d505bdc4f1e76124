"""Routes made of whole server spans (pure, deterministic given the view and the rng).

Servers serve exactly the span they announce (``docs/protocol.md`` §8: sub-spans are refused
with ``WrongSpan``), so a usable route chains servers whose spans tile ``[start, end)`` end to
end. The costs are those of :mod:`distllm.client.planner` -- entering a server costs
``rtt / 2 + hop_overhead`` (plus ``cache_penalty`` when it is short of cache for an inference
session), each of its blocks ``1 / rate`` -- and the search is a shortest path over block
boundaries: edges go from ``server.start`` to ``server.end``, always forward, so one pass in
boundary order is Dijkstra on this DAG. Ties go to fewer hops, then to lower peer ids.

A route for an ``adapter`` (a LoRA adapter the servers load by name) goes only through servers
that announce it; the others are not there for it.

:func:`plan_forward_route` draws each server's per-block time from an exponential of mean
``num_tokens / forward_rps`` (one draw per server, peer id order): an exponential race that
spreads stateless forward/backward load in proportion to throughput, as the planner does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Set

from distllm.client.errors import NoRouteError
from distllm.client.planner import DEFAULT_COSTS, RouteCosts, RouteHop
from distllm.client.swarm import ServerInfo, SwarmView
from distllm.ids import PeerID

__all__ = ["MisalignedSpansError", "plan_forward_route", "plan_session_route"]

#: Per-block rate assumed for a server announcing 0 (not measured): a last resort, not a hole.
_MIN_RATE = 1e-6


class MisalignedSpansError(NoRouteError):
    """Every block has a server, but their spans do not chain from ``start`` to ``end``."""

    def __init__(self, model: str, blocks: list[int], *, banned: int = 0) -> None:
        super().__init__(model, blocks, banned=banned)
        first = blocks[0] if blocks else 0
        self.args = (
            f"the spans served for model {model!r} do not chain through block {first}: "
            f"servers serve whole spans only" + (f" (banned: {banned})" if banned else ""),
        )


def plan_session_route(
    view: SwarmView,
    start: int,
    end: int,
    *,
    banned: Set[PeerID],
    cache_tokens_needed: int,
    costs: RouteCosts = DEFAULT_COSTS,
    adapter: str | None = None,
) -> list[RouteHop]:
    """The fastest chain of whole spans for decoding through ``[start, end)``."""

    def cost(server: ServerInfo) -> float:
        short = server.free_cache_tokens < cache_tokens_needed
        per_block = 1.0 / max(server.inference_rps, _MIN_RATE)
        return (
            view.rtt(server.peer) / 2
            + costs.hop_overhead
            + (costs.cache_penalty if short else 0.0)
            + (server.end - server.start) * per_block
        )

    return _shortest(view, start, end, banned, cost, adapter)


def plan_forward_route(
    view: SwarmView,
    start: int,
    end: int,
    *,
    banned: Set[PeerID],
    rng: random.Random,
    num_tokens: int = 1,
    costs: RouteCosts = DEFAULT_COSTS,
    adapter: str | None = None,
) -> list[RouteHop]:
    """A throughput-weighted random chain of whole spans for a stateless forward/backward."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens!r}")
    draws = {
        peer: num_tokens * rng.expovariate(max(server.forward_rps, _MIN_RATE))
        for peer, server in view.servers.items()
    }

    def cost(server: ServerInfo) -> float:
        enter = view.rtt(server.peer) / 2 + costs.hop_overhead
        return enter + (server.end - server.start) * draws[server.peer]

    return _shortest(view, start, end, banned, cost, adapter)


def _shortest(
    view: SwarmView,
    start: int,
    end: int,
    banned: Set[PeerID],
    cost: Callable[[ServerInfo], float],
    adapter: str | None,
) -> list[RouteHop]:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        raise ValueError(f"range [{start}, {end}) is empty or negative")
    if end > view.num_blocks:
        raise ValueError(f"range [{start}, {end}) is not within 0..{view.num_blocks}")
    starting_at: dict[int, list[ServerInfo]] = {}
    for server in view.servers.values():  # peer id order: ties keep the lowest peer id
        if (
            server.peer not in banned
            and server.serves(adapter)
            and start <= server.start
            and server.end <= end
        ):
            starting_at.setdefault(server.start, []).append(server)
    # best[b]: (seconds, hops) to reach boundary b; came[b]: the server whose span ends there.
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    came: dict[int, ServerInfo] = {}
    for boundary in range(start, end):  # edges only go forward: boundary order is topological
        reached = best.get(boundary)
        if reached is None:
            continue
        for server in starting_at.get(boundary, ()):
            candidate = (reached[0] + cost(server), reached[1] + 1)
            if candidate < best.get(server.end, (math.inf, 0)):
                best[server.end] = candidate
                came[server.end] = server
    if end not in best:
        raise _no_route(view, start, end, banned, max(best), adapter)
    route: list[RouteHop] = []
    boundary = end
    while boundary != start:
        server = came[boundary]
        route.append(RouteHop(server.peer, server.address, server.start, server.end))
        boundary = server.start
    route.reverse()
    return route


def _no_route(
    view: SwarmView,
    start: int,
    end: int,
    banned: Set[PeerID],
    furthest: int,
    adapter: str | None,
) -> NoRouteError:
    error: NoRouteError
    missing = view.uncovered_blocks(start, end, excluding=banned, adapter=adapter)
    if missing:
        holders = {s.peer for b in missing for s in view.servers_for_block(b) if s.serves(adapter)}
        error = NoRouteError(view.model, missing, banned=len(holders))
    else:
        # Covered, but not by spans that chain: servers that might chain once unbanned count.
        inside = {
            s.peer
            for s in view.servers.values()
            if start <= s.start and s.end <= end and s.serves(adapter)
        } & set(banned)
        error = MisalignedSpansError(view.model, list(range(furthest, end)), banned=len(inside))
    if adapter is not None:  # "... of model 'm' with adapter 'a' ..."
        named = f"model {view.model!r}"
        error.args = (str(error).replace(named, f"{named} with adapter {adapter!r}", 1),)
    return error
