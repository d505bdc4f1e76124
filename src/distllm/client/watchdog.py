"""Telling a dead server from a slow one while a step waits on it.

A server that vanishes mid-step (killed, crashed, cut off) is noticed by the transport only when
its keep-alives stop: ``dead_peer_timeout`` after the fact. A slow step proves nothing either: a
long prefill ahead in the server's queue delays every step behind it. So a step that has not
answered after ``suspect_after`` seconds gets its server *probed* (``span.info``: answered by
the server's event loop, never queued behind compute). A server that answers is alive and
merely busy -- the step keeps waiting and the next probe comes after twice the interval; one
that does not answer within its probe timeout is declared unresponsive and the step is
abandoned, so failover starts a few hundred milliseconds after a death instead of after the
keep-alive timeout.

A probe may also find the server alive but sure never to answer: it raises :class:`StepLost`
(a relayed step that never arrived), and the step is abandoned with that error as is.

Remote forward and backward calls, which a client may run several at a time, are watched one
by one instead: :func:`watched_call` runs a call next to a task of its own that probes the same
way (a task per call costs little next to a call that moves a batch of activations).

One :class:`StepWatch` per session watches its step in flight from a task of its own: starting
and ending a step costs two assignments (no task per step), and the watcher sleeps on an event
while the session is idle.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.abc

from distllm.errors import DistllmError

__all__ = ["StepLost", "StepWatch", "Unresponsive", "watched_call"]

Target = TypeVar("Target")
T = TypeVar("T")


class Unresponsive(DistllmError):
    """A server kept a step waiting and did not answer a liveness probe in time."""


class StepLost(DistllmError):
    """A probe found the server alive but without the step (it never got it): no answer will
    come, and nobody is to blame for it yet."""


@dataclass(eq=False)
class _InFlight(Generic[Target]):
    target: Target
    scope: anyio.CancelScope
    due: float  # when to probe next
    interval: float  # the wait before that probe; doubles after each answered probe
    failure: DistllmError | None = field(default=None)


class StepWatch(Generic[Target]):
    """Watches one step at a time (``with watch.watching(target): await ...``).

    ``probe(target)`` checks that the target's server is alive: it must return within
    ``probe_timeout(target)`` seconds. ``suspect_after`` ``None`` disables the watch.
    Run :meth:`run` in a task group and cancel it when done.
    """

    def __init__(
        self,
        suspect_after: float | None,
        probe: Callable[[Target], Awaitable[object]],
        probe_timeout: Callable[[Target], float],
        describe: Callable[[Target], str] = repr,
    ) -> None:
        self.suspect_after = suspect_after
        self._probe = probe
        self._probe_timeout = probe_timeout
        self._describe = describe
        self._flight: _InFlight[Target] | None = None
        self._wake: anyio.Event | None = None  # set while the watcher waits for a step
        #: Probes sent so far (all steps).
        self.probes = 0

    @contextmanager
    def watching(self, target: Target) -> Iterator[None]:
        """Run the block as the watched step of ``target``; if its server fails a probe, the
        block is cancelled and :class:`Unresponsive` raised (the probe's error as cause)."""
        if self.suspect_after is None:
            yield
            return
        if self._flight is not None:
            raise RuntimeError("a StepWatch watches one step at a time")
        with anyio.CancelScope() as scope:
            interval = self.suspect_after
            flight = _InFlight(target, scope, anyio.current_time() + interval, interval)
            self._flight = flight
            if self._wake is not None:
                self._wake.set()
            try:
                yield
            finally:
                self._flight = None
        if flight.failure is not None:
            raise flight.failure

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The watcher: probes overdue steps until cancelled."""
        task_status.started()
        if self.suspect_after is None:
            return
        while True:
            flight = self._flight
            if flight is None:
                self._wake = anyio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            now = anyio.current_time()
            if now < flight.due:
                # Wakes up once per interval while steps run; a step that ended meanwhile is
                # simply not the one in flight any more.
                await anyio.sleep(flight.due - now)
                continue
            await self._check(flight)

    async def _check(self, flight: _InFlight[Target]) -> None:
        self.probes += 1
        error = await _probe_once(
            functools.partial(self._probe, flight.target),
            self._probe_timeout(flight.target),
            self._describe(flight.target),
        )
        if error is None:
            flight.interval *= 2
            flight.due = anyio.current_time() + flight.interval
        elif self._flight is flight:  # (a step that ended meanwhile has nothing to abandon)
            flight.failure = error
            flight.scope.cancel()
            self._flight = None  # the cancelled step leaves the watch at once


async def _probe_once(
    probe: Callable[[], Awaitable[object]], probe_timeout: float, describe: str
) -> DistllmError | None:
    """One probe: ``None`` if the server answered in time; else why the step must be given up
    (:class:`Unresponsive`, or the probe's own :class:`StepLost`)."""
    began = anyio.current_time()
    try:
        with anyio.fail_after(probe_timeout):
            await probe()
    except StepLost as exc:
        return exc
    except Exception as exc:
        waited = anyio.current_time() - began
        error = Unresponsive(
            f"{describe} did not answer a liveness probe within {probe_timeout:g} s "
            f"({waited:.2f} s; {type(exc).__name__})"
        )
        error.__cause__ = exc
        return error
    return None


async def watched_call(
    call: Callable[[], Awaitable[T]],
    probe: Callable[[], Awaitable[object]],
    *,
    suspect_after: float | None,
    probe_timeout: float,
    describe: str,
) -> T:
    """``await call()``, probing its server (``probe()``) after ``suspect_after`` seconds
    without an answer and then after each doubled interval; a probe that fails or takes over
    ``probe_timeout`` cancels the call and raises :class:`Unresponsive`."""
    if suspect_after is None:
        return await call()
    failure: BaseException | None = None  # held: a task group would wrap it in a group
    outcome: list[T] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal failure
            interval = suspect_after
            while True:
                await anyio.sleep(interval)
                failure = await _probe_once(probe, probe_timeout, describe)
                if failure is not None:
                    tg.cancel_scope.cancel()
                    return
                interval *= 2

        tg.start_soon(watch)
        try:
            outcome.append(await call())
        except Exception as exc:
            failure = failure or exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not outcome:  # cancelled from outside: the cancellation propagates from the group
        raise RuntimeError("watched_call ended without an outcome")  # pragma: no cover
    return outcome[0]
