"""The client's live routing state for one model: the swarm view, bans and RTTs (async).

Drives the pure cores (:mod:`~distllm.client.swarm`, :mod:`~distllm.client.bans`,
:mod:`~distllm.client.routes`): refreshes the view from the DHT (periodically and on demand),
probes unmeasured servers with ``span.info`` to learn their round-trip times, bans failed
peers, and plans routes -- waiting, within a deadline, for a banned server to be allowed again
when nobody else holds its blocks.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Set

import anyio
import anyio.abc

from distllm.client.bans import BanList
from distllm.client.config import ClientConfig
from distllm.client.errors import NoRouteError
from distllm.client.planner import RouteHop
from distllm.client.routes import plan_forward_route, plan_session_route
from distllm.client.swarm import SwarmView
from distllm.dht.node import DHTNode
from distllm.dht.schema import block_keys
from distllm.errors import Busy, DistllmError
from distllm.ids import PeerID
from distllm.protocol.span_messages import METHOD_INFO, SpanInfo, SpanInfoRequest
from distllm.rpc import RpcEndpoint

__all__ = ["Router"]

logger = logging.getLogger("distllm.client")

#: RTT probes in flight at once.
_PROBES = 16


class Router:
    """Routing state of ``model`` (``num_blocks`` blocks) for one client."""

    def __init__(
        self,
        rpc: RpcEndpoint,
        dht: DHTNode | None,
        model: str,
        num_blocks: int,
        config: ClientConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._rpc = rpc
        self._dht = dht
        self.config = config
        self.view = SwarmView(model, num_blocks)
        self.bans = BanList(base=config.ban_base, factor=config.ban_factor, cap=config.ban_cap)
        self._ban_ends: dict[PeerID, float] = {}  # anyio clock; for waiting on a ban
        self._last_refresh = -math.inf
        self._refresh_lock = anyio.Lock()
        self.rng = rng if rng is not None else random.Random()

    @property
    def model(self) -> str:
        return self.view.model

    @property
    def num_blocks(self) -> int:
        return self.view.num_blocks

    # -- bans ----------------------------------------------------------------------------------

    def ban(self, peer: PeerID, cause: BaseException) -> float:
        """``peer`` failed with ``cause``: keep it out of new routes; returns the seconds."""
        now = anyio.current_time()
        at_least = cause.retry_after if isinstance(cause, Busy) else 0.0
        seconds = self.bans.ban(peer, now, at_least=at_least)
        self._ban_ends[peer] = now + seconds
        logger.info("banned %r for %.3g s: %s: %s", peer, seconds, type(cause).__name__, cause)
        return seconds

    def on_success(self, peer: PeerID) -> None:
        self.bans.on_success(peer)

    def banned(self) -> set[PeerID]:
        return self.bans.banned(anyio.current_time())

    # -- the view ------------------------------------------------------------------------------

    async def refresh(self, *, max_age: float = 0.0) -> None:
        """Re-read the model's announcements from the DHT (unless the view is younger than
        ``max_age`` s), then probe the servers whose RTT is unknown. Never raises for peers that
        do not answer: it keeps what it has."""
        async with self._refresh_lock:
            if anyio.current_time() - self._last_refresh < max_age:
                return
            with anyio.move_on_after(self.config.refresh_timeout):
                await self._read_dht()
                await self.measure_rtts()
            self._last_refresh = anyio.current_time()

    async def _read_dht(self) -> None:
        if self._dht is None:
            return
        keys = block_keys(self.model, 0, self.num_blocks)
        try:
            found = await self._dht.get_many(keys)
        except DistllmError as exc:
            logger.warning("refreshing %s from the DHT failed: %s", self.model, exc)
            return
        by_block = {block: found.get(key, {}).values() for block, key in enumerate(keys)}
        # The node verified every signature already.
        invalid = self.view.update(by_block, time.time(), verify=False)
        if invalid:
            logger.debug("%d invalid announcements for %s ignored", invalid, self.model)

    async def measure_rtts(self) -> None:
        """Probe every routable server with no RTT yet (``span.info``, one round trip on a
        warm connection); one that fails to answer is banned."""
        peers = [p for p in self.view.unmeasured() if not self.bans.is_banned(p, _now())]
        limiter = anyio.CapacityLimiter(_PROBES)
        async with anyio.create_task_group() as tg:
            for peer in peers:
                tg.start_soon(self._probe, peer, limiter)

    async def _probe(self, peer: PeerID, limiter: anyio.CapacityLimiter) -> None:
        server = self.view.servers.get(peer)
        if server is None:
            return
        async with limiter:
            began = anyio.current_time()
            try:
                await self._rpc.call(
                    server.address,
                    METHOD_INFO,
                    SpanInfoRequest(),
                    timeout=self.config.connect_timeout,
                    response_type=SpanInfo,
                )
            except DistllmError as exc:
                self.ban(peer, exc)
                return
            self.view.set_rtt(peer, anyio.current_time() - began)

    async def refresh_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh every ``refresh_period`` s, forever (a task of the client)."""
        task_status.started()
        period = self.config.refresh_period
        if period is None:
            return
        while True:
            await anyio.sleep(period)
            await self.refresh(max_age=period / 2)

    # -- planning ------------------------------------------------------------------------------

    async def plan_session(
        self,
        start: int,
        end: int,
        *,
        cache_tokens: int,
        deadline: float,
        adapter: str | None = None,
    ) -> list[RouteHop]:
        """The best route of whole spans for an inference session through ``[start, end)``
        (only through servers that announce ``adapter``, when one is named)."""
        return await self._plan(
            lambda banned: plan_session_route(
                self.view,
                start,
                end,
                banned=banned,
                cache_tokens_needed=cache_tokens,
                costs=self.config.costs,
                adapter=adapter,
            ),
            deadline,
        )

    async def plan_forward(
        self,
        start: int,
        end: int,
        *,
        num_tokens: int,
        deadline: float,
        adapter: str | None = None,
    ) -> list[RouteHop]:
        """A throughput-spreading route for a forward/backward through ``[start, end)`` (only
        through servers that announce ``adapter``, when one is named)."""
        return await self._plan(
            lambda banned: plan_forward_route(
                self.view,
                start,
                end,
                banned=banned,
                rng=self.rng,
                num_tokens=num_tokens,
                costs=self.config.costs,
                adapter=adapter,
            ),
            deadline,
        )

    def try_plan_forward(
        self, start: int, end: int, *, num_tokens: int, adapter: str | None = None
    ) -> list[RouteHop] | None:
        """:meth:`plan_forward` with what is known now: ``None`` instead of refreshing or
        waiting."""
        self.view.expire(time.time())
        try:
            return plan_forward_route(
                self.view,
                start,
                end,
                banned=self.banned(),
                rng=self.rng,
                num_tokens=num_tokens,
                costs=self.config.costs,
                adapter=adapter,
            )
        except NoRouteError:
            return None

    def try_plan_session(
        self, start: int, end: int, *, cache_tokens: int, adapter: str | None = None
    ) -> list[RouteHop] | None:
        """:meth:`plan_session` with what is known now: ``None`` instead of refreshing or
        waiting."""
        self.view.expire(time.time())
        try:
            return plan_session_route(
                self.view,
                start,
                end,
                banned=self.banned(),
                cache_tokens_needed=cache_tokens,
                costs=self.config.costs,
                adapter=adapter,
            )
        except NoRouteError:
            return None

    async def _plan(
        self, plan: Callable[[Set[PeerID]], list[RouteHop]], deadline: float
    ) -> list[RouteHop]:
        """``plan(banned)``; when no route avoids the banned peers: refresh the view, then wait
        for the next ban to end if that happens before ``deadline`` (else raise)."""
        refreshed = False
        while True:
            self.view.expire(time.time())
            try:
                return plan(self.banned())
            except NoRouteError as exc:
                if not refreshed:  # a server may have joined since: look once
                    refreshed = True
                    await self.refresh(max_age=self.config.min_refresh_interval)
                    continue
                wake = self._next_unban()
                if exc.banned == 0 or wake is None or wake > deadline:
                    raise
                logger.info("%s; waiting %.3g s for a ban to end", exc, wake - _now())
                await anyio.sleep_until(wake)

    def _next_unban(self) -> float | None:
        now = _now()
        ends = [t for t in self._ban_ends.values() if t > now]
        return min(ends) if ends else None


def _now() -> float:
    return anyio.current_time()
