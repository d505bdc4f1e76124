"""The compute thread's side, driven directly: chunks onto span.step, and a batch that does not
fit the cache failing only the jobs that cannot fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distllm.model import CacheFull, PagedKVCache, load_span
from distllm.protocol import InferenceStep, SessionParams, SpanSession, SpanShape
from distllm.server.backend import SpanBackend, row_runs
from distllm.server.jobs import InferenceJob
from distllm.server.scheduler import Chunk
from distllm.server.tensors import from_wire
from distllm.wire.tensors import WireTensor

HIDDEN = 64


@given(st.integers(1, 5), st.integers(1, 7), st.data())
def test_row_runs_cover_a_chunk_exactly(rows: int, length: int, data: st.DataObject) -> None:
    total = rows * length
    offset = data.draw(st.integers(0, total - 1))
    tokens = data.draw(st.integers(1, total - offset))
    runs = row_runs(offset, tokens, length)
    flat = [row * length + t for row, begin, end in runs for t in range(begin, end)]
    assert flat == list(range(offset, offset + tokens))
    assert len({row for row, _, _ in runs}) == len(runs)  # one run per row


def job(key: int, session: str, x: torch.Tensor, start: int = 0) -> tuple[InferenceJob, Chunk]:
    step = InferenceStep(WireTensor.from_numpy(x.numpy()), start, None, None, key)
    machine = SpanSession(SessionParams(256, x.shape[0], "float32", SpanShape(4, HIDDEN)))
    machine.position = start  # as if earlier steps had run
    plan = machine.receive_step(step)
    item = InferenceJob(key, session, step, plan, "float32", "none")
    return item, Chunk(item.work_item(), 0, plan.total_tokens)


@pytest.mark.anyio
@pytest.mark.parametrize("max_batch_sessions", [None, 1])
async def test_a_batch_that_does_not_fit_fails_only_what_cannot_fit(
    max_batch_sessions: int | None, checkpoint: Callable[[str], Path]
) -> None:
    span = load_span(checkpoint("llama"), 0, 4)
    cache = PagedKVCache(span, num_pages=16, page_size=4)
    backend = SpanBackend(span, cache, max_batch_sessions=max_batch_sessions)
    prefix = {name: torch.randn(1, 20, HIDDEN) for name in "ab"}
    outcome = backend.run_inference([job(1, "a", prefix["a"]), job(2, "b", prefix["b"])])
    assert not outcome.failures and cache.manager.pool.num_free == 6
    calls = backend.step_calls
    # 4 more pages each; 6 are free: together they do not fit, alone the first one does
    more = torch.randn(1, 16, HIDDEN)
    outcome = backend.run_inference([job(3, "a", more, start=20), job(4, "b", more, start=20)])
    assert set(outcome.results) == {3} and isinstance(outcome.failures[4], CacheFull)
    assert backend.step_calls - calls == 1  # step_calls counts the forwards that completed
    result = outcome.results[3]
    assert isinstance(result, WireTensor)
    with torch.no_grad():
        expected = span(torch.cat([prefix["a"], more], dim=1))[:, 20:]
    torch.testing.assert_close(from_wire(result), expected, atol=1e-4, rtol=1e-4)
    assert cache.length(("a", 0, 0)) == 36 and cache.length(("b", 1, 0)) == 20  # b unchanged
    backend.release_all()
    assert cache.manager.pool.num_free == 16
    assert np.isfinite(from_wire(result).numpy()).all()
