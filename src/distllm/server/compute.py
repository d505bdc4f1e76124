"""The compute loop: one task on the event loop feeds one compute thread, batch after batch.

Calls submit jobs (:meth:`ComputeLoop.infer`, :meth:`ComputeLoop.train`) and wait for them.
The loop task asks the :class:`~distllm.server.scheduler.BatchScheduler` for the next batch and
runs it on the compute thread (``anyio.to_thread.run_sync`` with a limiter of one: torch never
runs on the event loop, and never on two threads at once). While a batch computes, new steps
queue up; the next batch takes every ready one -- continuous batching. How a batch maps onto
``span.step`` is :mod:`distllm.server.backend`'s business.

Sessions that just got an output usually send their next step within a round trip; the loop
waits up to ``batch_window`` for them before taking a batch, so that they run together.

The KV cache is only ever touched on the compute thread: closing a session queues a release
that the next thread call applies before its batch. So are kept forward graphs: every thread call
first drops those past their time to live, and an idle loop wakes up to do so when the oldest
expires. Graphs of a caller that is no longer connected are dropped too (its backwards will
never come): while graphs are kept, the loop checks their callers' connections at most every
:data:`OWNER_CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from distllm.errors import Busy, DeadlineExceeded
from distllm.protocol.span_messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
)
from distllm.protocol.span_session import StepPlan
from distllm.server.backend import Outcome, SpanBackend
from distllm.server.config import ServerConfig
from distllm.server.jobs import InferenceJob, Job, TrainingJob
from distllm.server.scheduler import Batch, BatchScheduler, Chunk
from distllm.wire.tensors import WireTensor

__all__ = ["OWNER_CHECK_INTERVAL", "ComputeLoop", "ComputeStats"]

logger = logging.getLogger("distllm.server")

#: ``retry_after`` suggested to callers whose work is dropped because the server stops.
_SHUTDOWN_RETRY_AFTER = 1.0
#: Seconds between checks that the callers whose forward graphs are kept are still connected.
OWNER_CHECK_INTERVAL: Final = 1.0


@dataclass
class ComputeStats:
    """Counters of the compute loop (read them; they only grow)."""

    batches: int = 0  # thread calls that computed something
    inference_chunks: int = 0  # session steps (or chunks of long ones) computed
    inference_tokens: int = 0
    training_requests: int = 0  # forward and backward requests computed
    failed_jobs: int = 0


class ComputeLoop:
    """Schedules and runs the work of one span; start :meth:`run` in a task group."""

    def __init__(
        self,
        backend: SpanBackend,
        config: ServerConfig,
        limiter: anyio.CapacityLimiter,
        is_connected: Callable[[Hashable], bool] | None = None,
    ) -> None:
        """``is_connected(caller)``: whether a caller is still connected (``None``: kept graphs
        are dropped by their time to live and the budget only)."""
        self._backend = backend
        self._is_connected = is_connected
        self._owners_checked = -math.inf
        self._config = config
        self._limiter = limiter
        self._scheduler = BatchScheduler(
            max_batch_tokens=config.max_batch_tokens,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
            max_queued_items=config.max_queued_items,
            max_queued_tokens=config.max_queued_tokens,
            max_training_wait=config.max_training_wait,
        )
        self._keys = itertools.count()
        # Invariant: every item queued in the scheduler has its job here.
        self._jobs: dict[Hashable, Job] = {}
        self._releases: list[Hashable] = []
        # Sessions that got an output since the last batch and may send a step any moment.
        self._expected: set[Hashable] = set()
        # When each session last got an output, and how long it then took to send its next
        # step: sessions slower than the batch window (remote, thinking) are not waited for.
        self._delivered_at: dict[Hashable, float] = {}
        self._turnaround: dict[Hashable, float] = {}
        self._wakeup = anyio.Event()
        self._stopped = False
        self.stats = ComputeStats()

    @property
    def step_calls(self) -> int:
        """``span.step`` calls so far: fewer than the steps computed means batching happened."""
        return self._backend.step_calls

    @property
    def queued_items(self) -> int:
        return len(self._scheduler)

    @property
    def queued_tokens(self) -> int:
        return self._scheduler.queued_tokens

    # -- calls ---------------------------------------------------------------------------------

    async def infer(
        self,
        session: Hashable,
        step: InferenceStep,
        plan: StepPlan,
        dtype: str,
        compression: str,
        adapter: str | None = None,
    ) -> WireTensor:
        """Compute one validated step of ``session`` (with LoRA ``adapter``, a loaded one);
        its output ``[B, n, h]``."""
        job = InferenceJob(next(self._keys), session, step, plan, dtype, compression, adapter)
        self._expected.discard(session)
        delivered = self._delivered_at.pop(session, None)
        if delivered is not None:
            self._turnaround[session] = anyio.current_time() - delivered
        result = await self._run(job)
        if not isinstance(result, WireTensor):  # pragma: no cover - backend contract
            raise TypeError(f"inference produced {type(result).__name__}")
        return result

    async def train(
        self,
        request: ForwardRequest | BackwardRequest,
        compression: str,
        caller: Hashable = None,
    ) -> ForwardResponse | BackwardResponse:
        """Compute a validated forward or backward request of ``caller`` (a kept forward graph
        is only ever used by the backward of the caller that ran the forward)."""
        result = await self._run(TrainingJob(next(self._keys), request, compression, caller))
        if not isinstance(result, ForwardResponse | BackwardResponse):  # pragma: no cover
            raise TypeError(f"training produced {type(result).__name__}")
        return result

    def release(self, session: Hashable) -> None:
        """Free the session's cache pages (soon, on the compute thread). Never blocks."""
        self._expected.discard(session)
        self._delivered_at.pop(session, None)
        self._turnaround.pop(session, None)
        if not self._stopped:
            self._releases.append(session)
            self._wakeup.set()

    async def _run(self, job: Job) -> object:
        if self._stopped:
            raise Busy("the server is shutting down", _SHUTDOWN_RETRY_AFTER)
        refusal = self._scheduler.submit(job.work_item(), anyio.current_time())
        if refusal is not None:
            raise Busy(refusal.reason, refusal.retry_after)
        self._jobs[job.key] = job
        self._wakeup.set()
        try:
            with anyio.move_on_after(self._config.step_timeout):
                await job.done.wait()
        finally:
            if not job.done.is_set():  # timed out or cancelled (its caller went away)
                self._scheduler.cancel(job.key)
            self._jobs.pop(job.key, None)
        if not job.done.is_set():
            raise DeadlineExceeded(f"not computed within {self._config.step_timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result

    # -- the loop ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Compute batches until cancelled; then fail whatever is still waiting."""
        task_status.started()
        try:
            while True:
                if not len(self._scheduler) and not self._releases:
                    await self._idle()
                    continue
                await self._gather()
                await self._run_next()
        finally:
            self._stopped = True
            for job in list(self._jobs.values()):
                if not job.done.is_set():
                    job.fail(Busy("the server is shutting down", _SHUTDOWN_RETRY_AFTER))

    async def _idle(self) -> None:
        """Wait for work; meanwhile drop kept graphs as they expire or their callers leave."""
        expiry = self._backend.next_graph_expiry()  # the thread is idle: safe to read
        wake = math.inf if expiry is None else expiry
        if expiry is not None and self._is_connected is not None:
            wake = min(wake, self._owners_checked + OWNER_CHECK_INTERVAL)
        with anyio.move_on_at(wake):
            await self._wakeup.wait()
        if self._wakeup.is_set():
            self._wakeup = anyio.Event()
        elif expiry is not None:
            now = anyio.current_time()
            gone = self._gone_owners(now)
            await anyio.to_thread.run_sync(self._expire, now, gone, limiter=self._limiter)

    def _gone_owners(self, now: float) -> set[Hashable]:
        """Callers with kept graphs that are no longer connected (checked at most every
        ``OWNER_CHECK_INTERVAL``; call only while the thread is idle)."""
        if self._is_connected is None or now < self._owners_checked + OWNER_CHECK_INTERVAL:
            return set()
        self._owners_checked = now
        is_connected = self._is_connected
        return {c for c in self._backend.graph_callers() if not is_connected(c)}

    def _expire(self, now: float, gone: set[Hashable]) -> None:
        """On the compute thread: drop graphs past their time to live and of callers gone."""
        self._backend.drop_graphs_of(gone)
        self._backend.expire_graphs(now)

    async def _gather(self) -> None:
        """Give sessions that just got an output a moment to send their next step."""
        window = self._config.batch_window
        if window > 0 and self._expected:
            with anyio.move_on_after(window):
                while self._expected:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
        self._expected.clear()  # who missed this batch is not waited for again

    async def _run_next(self) -> None:
        # No await between taking the batch and starting the thread: a job cancelled meanwhile
        # would otherwise be computed after its session's pages were released.
        batch = self._scheduler.next_batch(anyio.current_time())
        releases, self._releases = self._releases, []
        work = [] if batch is None else self._work_of(batch)
        now = anyio.current_time()
        gone = self._gone_owners(now)  # the thread is idle: safe to read
        outcome = await anyio.to_thread.run_sync(
            self._compute, releases, work, now, gone, limiter=self._limiter
        )
        self._deliver(work, outcome)

    def _work_of(self, batch: Batch) -> list[tuple[Job, Chunk]]:
        return [(self._jobs[chunk.item.key], chunk) for chunk in batch.chunks]

    def _compute(
        self,
        releases: list[Hashable],
        work: list[tuple[Job, Chunk]],
        now: float,
        gone: set[Hashable],
    ) -> Outcome:
        """On the compute thread: apply releases, drop expired graphs (and those of callers
        gone), compute the batch."""
        for session in releases:
            self._backend.release(session)
        self._expire(now, gone)
        if not work:
            return Outcome()
        first = work[0][0]
        if isinstance(first, TrainingJob):
            outcome = Outcome()
            try:
                outcome.results[first.key] = self._backend.run_training(first, now)
            except Exception as exc:
                outcome.failures[first.key] = exc
            return outcome
        inference = [(job, chunk) for job, chunk in work if isinstance(job, InferenceJob)]
        return self._backend.run_inference(inference)

    def _deliver(self, work: list[tuple[Job, Chunk]], outcome: Outcome) -> None:
        if work:
            self.stats.batches += 1
        for job, chunk in work:
            if isinstance(job, InferenceJob):
                self.stats.inference_chunks += 1
                self.stats.inference_tokens += chunk.tokens
            else:
                self.stats.training_requests += 1
            error = outcome.failures.get(job.key)
            if error is not None:
                self.stats.failed_jobs += 1
                self._scheduler.cancel(job.key)  # the rest of a chunked step, if any
                job.fail(error)
            elif job.key in outcome.results:
                job.finish(outcome.results[job.key])
                if isinstance(job, InferenceJob):
                    self._expect(job.session)

    def _expect(self, session: Hashable) -> None:
        self._delivered_at[session] = anyio.current_time()
        if self._turnaround.get(session, 0.0) <= self._config.batch_window:
            self._expected.add(session)
