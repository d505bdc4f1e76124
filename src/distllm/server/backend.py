"""The span and its paged KV cache, as the compute thread drives them (torch; no IO, no anyio).

Every row of an inference session is one sequence of the cache, named ``(session, generation,
row)``; reordering rows (``hypo_ids``) forks new sequences from the old ones copy-on-write and
bumps the generation. Nothing here is thread-safe: only the compute thread calls it.

Mapping a batch onto :meth:`SpanModel.step`: a job's positions are flattened row by row (``B``
rows of ``n`` tokens), and the scheduler hands out chunks ``[offset, offset + k)`` of them. A
chunk covers a contiguous run of tokens in each row it touches; each run becomes one
:class:`~distllm.model.StepInput`. All runs of all jobs of a batch go into one ``step`` call (or
groups of ``max_batch_sessions`` jobs). A batch that does not fit the cache is retried job by
job, so that only the jobs that cannot fit fail. Jobs of sessions with different LoRA adapters
never share a ``step`` call: the runs are grouped by adapter, one call (or more) per adapter.

Forward requests that name a ``forward_id`` may keep their autograd graph in a
:class:`~distllm.server.graphs.GraphStore` for their backward (see :mod:`distllm.server.graphs`).

Left padding (``plan.padding``): a row's pad positions are cut from its runs (a run left empty
is dropped) and stay zeros in the output; the row's cache positions are the session's minus its
padding, so each row is an ordinary, unpadded sequence of the cache.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from distllm.model import CacheFull, PagedKVCache, SpanModel, StepInput
from distllm.model.adapters import SpanAdapters
from distllm.protocol.errors import UnknownForward
from distllm.protocol.span_messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
)
from distllm.protocol.span_session import StepPlan
from distllm.server.graphs import GraphStore, storage_keys
from distllm.server.jobs import InferenceJob, TrainingJob
from distllm.server.scheduler import Chunk
from distllm.server.tensors import check_finite, from_wire, to_wire
from distllm.server.training import (
    graph_lower_bound,
    run_backward,
    run_backward_kept,
    run_forward,
    run_forward_keeping,
)

__all__ = ["Outcome", "RowRun", "SpanBackend", "row_runs"]

logger = logging.getLogger("distllm.server")


def row_runs(offset: int, tokens: int, row_length: int) -> list[tuple[int, int, int]]:
    """``(row, begin, end)`` runs of flattened positions ``[offset, offset + tokens)`` of rows
    of ``row_length`` tokens each."""
    runs = []
    position, stop = offset, offset + tokens
    while position < stop:
        row, begin = divmod(position, row_length)
        end = min(row_length, begin + stop - position)
        runs.append((row, begin, end))
        position += end - begin
    return runs


@dataclass(frozen=True, slots=True)
class RowRun:
    """Tokens ``[begin, end)`` of one row of a job, computed in this batch."""

    job: InferenceJob
    row: int
    begin: int
    end: int
    sequence: Hashable  # the row's cache sequence

    @property
    def start_position(self) -> int:
        """Position of the run's first token in the row's own (unpadded) sequence."""
        plan = self.job.plan
        return plan.start + self.begin - plan.row_padding(self.row)


@dataclass
class Outcome:
    """What a batch produced: results of the jobs it completed, errors of those that failed."""

    results: dict[int, object] = field(default_factory=dict)
    failures: dict[int, BaseException] = field(default_factory=dict)


class SpanBackend:
    """Runs inference batches, forward and backward requests over one span and its cache."""

    def __init__(
        self,
        span: SpanModel,
        cache: PagedKVCache,
        *,
        max_batch_sessions: int | None = None,
        check_finite: bool = True,
        adapters: SpanAdapters | None = None,
        graphs: GraphStore | None = None,
    ) -> None:
        self.span = span
        self.cache = cache
        self._max_batch_sessions = max_batch_sessions
        self._check_finite = check_finite
        self.adapters = adapters
        #: Kept forward graphs; ``None``: forwards never keep theirs.
        self.graphs = graphs
        # Storages of the weights: a graph refers to them but does not keep them alive.
        self._weights = storage_keys([*span.parameters(), *span.buffers()])
        self._rows: dict[Hashable, list[Hashable]] = {}
        self._generations = itertools.count()
        #: ``span.step`` calls made (one per batched forward of inference work).
        self.step_calls = 0

    # -- sessions ------------------------------------------------------------------------------

    def release(self, session: Hashable) -> None:
        """Close the session's cache sequences (its pages return to the pool)."""
        for sequence in self._rows.pop(session, ()):
            self.cache.close(sequence)

    def release_all(self) -> None:
        for session in list(self._rows):
            self.release(session)

    def _open_rows(self, session: Hashable, batch_size: int) -> list[Hashable]:
        rows = self._rows.get(session)
        if rows is None:
            generation = next(self._generations)
            rows = [(session, generation, row) for row in range(batch_size)]
            for sequence in rows:
                self.cache.open(sequence)
            self._rows[session] = rows
        return rows

    def _reorder(self, session: Hashable, hypo_ids: Sequence[int], plan: StepPlan) -> None:
        """Row ``i`` continues from old row ``hypo_ids[i]``'s tokens before ``plan.start``."""
        old = self._rows[session]
        generation = next(self._generations)
        new: list[Hashable] = [(session, generation, row) for row in range(len(old))]
        for row, (sequence, source) in enumerate(zip(new, hypo_ids, strict=True)):
            # Equal padding (checked by the protocol): the same cut for source and row.
            keep = max(0, plan.start - plan.row_padding(row))
            self.cache.fork(old[source], sequence, keep)  # shares pages, copies on write
        for sequence in old:
            self.cache.close(sequence)
        self._rows[session] = new

    def _roll_back_padded(self, session: Hashable, plan: StepPlan) -> None:
        """Forget each row's tokens from ``plan.start`` on. ``span.step`` does this for rows
        with tokens in the step; a row whose new positions are all padding has none."""
        for row, sequence in enumerate(self._rows[session]):
            keep = max(0, plan.start - plan.row_padding(row))
            if self.cache.length(sequence) > keep:
                self.cache.manager.truncate(sequence, keep)

    # -- inference -----------------------------------------------------------------------------

    def run_inference(self, work: Sequence[tuple[InferenceJob, Chunk]]) -> Outcome:
        """Compute one batch of inference chunks; finished jobs get their encoded outputs."""
        outcome = Outcome()
        ready: list[list[RowRun]] = []
        for job, chunk in work:
            try:
                if chunk.offset == 0:
                    self._begin(job)
                rows = self._rows[job.session]
                runs = [
                    RowRun(job, row, begin, end, rows[row])
                    for row, begin, end in _unpadded_runs(job, chunk)
                ]
                if runs:  # a chunk of pad tokens only has nothing to compute
                    ready.append(runs)
            except Exception as exc:
                outcome.failures[job.key] = exc
        by_adapter: dict[str | None, list[list[RowRun]]] = {}
        for runs in ready:
            by_adapter.setdefault(runs[0].job.adapter, []).append(runs)
        for adapter, jobs_runs in by_adapter.items():
            self._use_adapter(adapter)
            size = self._max_batch_sessions or len(jobs_runs)
            for i in range(0, len(jobs_runs), size):
                self._run_group(jobs_runs[i : i + size], outcome)
        for job, chunk in work:
            if job.key in outcome.failures:
                job.drop_tensors()
            elif chunk.completes_item:
                try:
                    assert job.output is not None  # set by _begin
                    # [B, n, h] -> [B, k, h]: the rows' last k outputs, all that was asked for
                    output = job.output[:, job.output.shape[1] - job.plan.output_tokens :]
                    outcome.results[job.key] = to_wire(
                        output.contiguous(), job.dtype, job.compression
                    )
                except Exception as exc:
                    outcome.failures[job.key] = exc
                job.drop_tensors()
        return outcome

    def _begin(self, job: InferenceJob) -> None:
        """Decode the step's tensors, open or reorder the rows, make room for the output."""
        step, plan = job.step, job.plan
        hidden = from_wire(step.hidden)
        if self._check_finite:
            check_finite(hidden, "hidden")
        if step.prompts is not None:
            prompts = from_wire(step.prompts)
            if self._check_finite:
                check_finite(prompts, "prompts")
            job.prompts = prompts.to(self.span.dtype)
        self._open_rows(job.session, plan.batch_size)
        if plan.hypo_ids is not None:
            self._reorder(job.session, plan.hypo_ids, plan)
        if plan.padding is not None:
            self._roll_back_padded(job.session, plan)
        job.hidden = hidden
        # Pad positions are never written: zeros there.
        empty = torch.empty if plan.padding is None else torch.zeros
        job.output = empty(hidden.shape, dtype=self.span.dtype)

    def _run_group(self, group: list[list[RowRun]], outcome: Outcome) -> None:
        try:
            self._step([run for runs in group for run in runs])
            return
        except CacheFull as exc:
            if len(group) == 1:
                outcome.failures[group[0][0].job.key] = exc
                return
        except Exception as exc:
            logger.exception("a batched inference step failed")
            for runs in group:
                outcome.failures[runs[0].job.key] = exc
            return
        # The batch does not fit: each job alone, so that only those that cannot fit fail.
        for runs in group:
            try:
                self._step(runs)
            except Exception as exc:
                outcome.failures[runs[0].job.key] = exc

    def _step(self, runs: list[RowRun]) -> None:
        inputs = []
        for run in runs:
            assert run.job.hidden is not None  # set by _begin
            inputs.append(
                StepInput(
                    run.sequence, run.job.hidden[run.row, run.begin : run.end], run.start_position
                )
            )
        with self._prompt_hooks(runs):
            outputs = self.span.step(self.cache, inputs)
        self.step_calls += 1
        for run, out in zip(runs, outputs, strict=True):
            assert run.job.output is not None
            run.job.output[run.row, run.begin : run.end] = out

    @contextmanager
    def _prompt_hooks(self, runs: list[RowRun]) -> Iterator[None]:
        """Add each run's deep prompts before every block, at the positions they cover.

        ``span.step`` flattens the runs' tokens into one row ``[1, T, h]``; a pre-hook on block
        ``i`` adds ``delta[i]`` ``[T, h]``, which holds ``prompts[i]`` at the prompted positions.
        """
        delta: torch.Tensor | None = None
        offset = 0
        for run in runs:
            prompts, first = run.job.prompts, run.start_position
            covered = 0 if prompts is None else min(run.end - run.begin, prompts.shape[2] - first)
            if prompts is not None and covered > 0:
                if delta is None:
                    total = sum(r.end - r.begin for r in runs)
                    shape = (self.span.num_blocks, total, self.span.hidden_size)
                    delta = torch.zeros(shape, dtype=self.span.dtype)
                row = run.row if prompts.shape[1] > 1 else 0
                delta[:, offset : offset + covered] = prompts[:, row, first : first + covered]
            offset += run.end - run.begin
        if delta is None:
            yield
            return
        handles = [
            block.register_forward_pre_hook(_Adder(delta[i]), with_kwargs=True)
            for i, block in enumerate(self.span.blocks)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- forward and backward ------------------------------------------------------------------

    def run_training(self, job: TrainingJob, now: float) -> ForwardResponse | BackwardResponse:
        """Run a forward or backward request (alone: it has its own shapes and autograd)."""
        request = job.request
        self._use_adapter(request.adapter)
        if isinstance(request, ForwardRequest):
            return self._forward(job, request, now)
        return self._backward(job, request, now)

    def _forward(self, job: TrainingJob, request: ForwardRequest, now: float) -> ForwardResponse:
        store, finite = self.graphs, self._check_finite
        if request.forward_id is None or store is None:
            return run_forward(self.span, request, job.compression, finite)
        if not store.fits(graph_lower_bound(self.span, request)):
            store.remember(job.caller, request.forward_id)  # too big to keep: no autograd
            return run_forward(self.span, request, job.compression, finite)
        response, graph = run_forward_keeping(
            self.span, request, job.compression, finite, self._weights
        )
        store.keep(job.caller, request.forward_id, graph, now)  # or drops it: too big
        return response

    def _backward(self, job: TrainingJob, request: BackwardRequest, now: float) -> BackwardResponse:
        finite = self._check_finite
        if request.forward_id is not None:
            if self.graphs is None:
                raise UnknownForward("this server keeps no forward graphs")
            graph = self.graphs.take(job.caller, request.forward_id, now)
            if graph is not None:
                return run_backward_kept(self.span, graph, request, job.compression, finite)
        return run_backward(self.span, request, job.compression, finite)

    def _use_adapter(self, name: str | None) -> None:
        if self.adapters is not None:
            self.adapters.activate(name)
        elif name is not None:  # the handlers check names first: a bug if it gets here
            raise KeyError(f"no adapters are loaded, asked for {name!r}")

    # -- kept graphs ---------------------------------------------------------------------------

    def expire_graphs(self, now: float) -> None:
        """Drop kept graphs older than their time to live."""
        if self.graphs is not None:
            self.graphs.expire(now)

    def next_graph_expiry(self) -> float | None:
        return None if self.graphs is None else self.graphs.next_expiry()

    def graph_callers(self) -> set[Hashable]:
        """Callers whose forward graphs are kept."""
        return set() if self.graphs is None else self.graphs.callers()

    def drop_graphs_of(self, callers: Iterable[Hashable]) -> None:
        """Drop the kept graphs of ``callers`` (gone: their backwards will never come)."""
        if self.graphs is not None:
            for caller in callers:
                self.graphs.drop_caller(caller)

    def drop_graphs(self) -> None:
        """Drop every kept graph (the server stops)."""
        if self.graphs is not None:
            self.graphs.clear()


def _unpadded_runs(job: InferenceJob, chunk: Chunk) -> list[tuple[int, int, int]]:
    """``row_runs`` of the chunk without the rows' pad positions (empty runs dropped)."""
    plan = job.plan
    runs = row_runs(chunk.offset, chunk.tokens, plan.num_tokens)
    if plan.padding is None:
        return runs
    clipped = []
    for row, begin, end in runs:
        first_real = plan.row_padding(row) - plan.start  # step-relative; may be <= 0
        begin = max(begin, first_real)
        if begin < end:
            clipped.append((row, begin, end))
    return clipped


class _Adder:
    """Forward pre-hook: add ``delta`` ``[T, h]`` to a block's input ``[1, T, h]``."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (args[0] + self.delta[None], *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + self.delta[None]
        return args, kwargs
