"""What a session does about a failed hop: which hops to re-route, and how long it may try.

Servers serve whole spans, so the blocks of a lost hop can be re-routed alone only if some chain
of spans fits them exactly; otherwise the fewest hops around it are re-routed together
(:func:`plan_replacement`). :class:`Recovery` counts the failures of one step and bounds the
time it has to recover.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from distllm.client.failures import RouteFailedError
from distllm.client.planner import RouteHop
from distllm.client.router import Router

__all__ = ["Recovery", "plan_replacement"]


async def plan_replacement(
    router: Router,
    route: Sequence[RouteHop],
    i: int,
    error: Exception,
    *,
    cache_tokens: int,
    deadline: float,
    adapter: str | None = None,
) -> tuple[int, int, list[RouteHop]]:
    """A new route for hops ``first..last`` of ``route`` (``first <= i <= last``), hop ``i``
    having failed with ``error``: for hop ``i``'s blocks alone if possible, else for the fewest
    hops around it (those to the right first: they have not taken the step yet); looking at the
    swarm again if nothing fits, finally waiting (until ``deadline``) for a ban to end. Only
    servers that announce ``adapter`` (when one is named) are considered."""
    ranges = sorted(
        ((a, b) for a in range(i + 1) for b in range(i, len(route))),
        key=lambda ab: (ab[1] - ab[0], i - ab[0]),
    )
    for attempt in range(2):
        for a, b in ranges:
            found = router.try_plan_session(
                route[a].start, route[b].end, cache_tokens=cache_tokens, adapter=adapter
            )
            if found is not None:
                return a, b, found
        if attempt == 0:
            await router.refresh(max_age=router.config.min_refresh_interval)
    failed = route[i]
    try:
        found = await router.plan_session(
            failed.start, failed.end, cache_tokens=cache_tokens, deadline=deadline, adapter=adapter
        )
    except Exception as exc:
        exc.__cause__ = exc.__cause__ or error  # name the failure that started it
        raise
    return i, i, found


class Recovery:
    """The failures of one step (or one opening): counted, and -- from the first one on --
    bounded in time by ``scope``, a cancel scope around the whole step."""

    def __init__(self, scope: anyio.CancelScope, timeout: float, model: str) -> None:
        self.scope = scope
        self.timeout = timeout
        self.model = model
        self.failures = 0
        self.began: float | None = None
        self.last: tuple[RouteHop, Exception] | None = None

    def failed(self, hop: RouteHop, error: Exception) -> None:
        self.failures += 1
        self.last = (hop, error)
        if self.began is None:
            self.began = anyio.current_time()
            self.scope.deadline = self.began + self.timeout

    def check(self) -> None:
        """After the scope: raise if recovering took longer than allowed."""
        if self.scope.cancelled_caught and self.last is not None:
            hop, error = self.last
            raise RouteFailedError(
                self.model, hop, self.failures, error, within=self.timeout
            ) from error
