"""Telling a dead server from a slow one while a step waits on it.

A server that vanishes mid-step (killed, crashed, cut off) is noticed by the transport only when
its keep-alives stop: ``dead_peer_timeout`` after the fact. A slow step proves nothing either: a
long prefill ahead in the server's queue delays every step behind it. So a step that has not
answered after ``suspect_after`` seconds gets its server *probed* (``span.info``: answered by
the server's event loop, never queued behind compute). A server that answers is alive and
merely busy -- the step keeps waiting and the next probe comes after twice the interval; one
that does not answer within ``probe_timeout`` is declared unresponsive and the step is
abandoned, so failover starts a few hundred milliseconds after a death instead of after the
keep-alive timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from distllm.errors import DistllmError

__all__ = ["Unresponsive", "watched"]

T = TypeVar("T")


class Unresponsive(DistllmError):
    """A server kept a step waiting and did not answer a liveness probe in time."""


async def watched(
    call: Callable[[], Awaitable[T]],
    probe: Callable[[], Awaitable[object]],
    *,
    suspect_after: float | None,
    probe_timeout: float,
    who: str,
) -> T:
    """``await call()``; while it runs past ``suspect_after``, ``probe()`` its server. A probe
    that raises or overruns ``probe_timeout`` means the server is gone: ``call`` is cancelled
    and :class:`Unresponsive` raised (the probe's error as its cause). ``None``: no probes.

    Errors of ``call`` propagate as they are (never wrapped in an exception group).
    """
    if suspect_after is None:
        return await call()
    outcome: list[T] = []
    failure: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                outcome.append(await call())
            except Exception as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            interval = suspect_after
            while True:
                await anyio.sleep(interval)
                began = anyio.current_time()
                try:
                    with anyio.fail_after(probe_timeout):
                        await probe()
                except Exception as exc:
                    waited = anyio.current_time() - began
                    error = Unresponsive(
                        f"{who} did not answer a liveness probe within {probe_timeout:g} s "
                        f"({waited:.2f} s; {type(exc).__name__})"
                    )
                    error.__cause__ = exc
                    failure.append(error)
                    tg.cancel_scope.cancel()
                    return
                interval *= 2

        tg.start_soon(run)
        tg.start_soon(watch)
    if outcome:  # the step's answer wins a race with a failed probe
        return outcome[0]
    raise failure[0]
