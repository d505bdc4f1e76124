from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from distllm.server.scheduler import BatchScheduler, WorkItem, WorkKind


def test_decode_steps_of_different_sessions_share_one_batch() -> None:
    scheduler = BatchScheduler(max_batch_tokens=64, prefill_chunk_tokens=16)
    for session in range(16):
        assert scheduler.submit(WorkItem(session, WorkKind.INFERENCE, 1, session), now=0) is None
    batch = scheduler.next_batch(now=0)
    assert batch is not None
    assert sorted(chunk.item.session for chunk in batch.chunks) == list(range(16))
    assert scheduler.next_batch(now=0) is None


def test_long_prefill_is_chunked_and_cannot_starve_decoding() -> None:
    scheduler = BatchScheduler(max_batch_tokens=128, prefill_chunk_tokens=100)
    scheduler.submit(WorkItem("prompt", WorkKind.INFERENCE, 1000, "a"), now=0)
    for step in range(5):
        scheduler.submit(WorkItem(("decode", step), WorkKind.INFERENCE, 1, "b"), now=step)
        batch = scheduler.next_batch(now=step)
        assert batch is not None
        kinds = {chunk.item.key for chunk in batch.chunks}
        assert ("decode", step) in kinds  # the waiting decode step rides in the very next batch
        assert batch.tokens <= 128
    assert scheduler.queued_tokens == 1000 - 5 * 100


def test_inference_outranks_training_until_training_is_old() -> None:
    scheduler = BatchScheduler(max_training_wait=2.0)
    scheduler.submit(WorkItem("fwd", WorkKind.FORWARD, 512), now=0)
    scheduler.submit(WorkItem("dec", WorkKind.INFERENCE, 1, "s"), now=0)
    first = scheduler.next_batch(now=0.5)
    assert first is not None and not first.is_training
    scheduler.submit(WorkItem("dec2", WorkKind.INFERENCE, 1, "s"), now=2.5)
    aged = scheduler.next_batch(now=2.5)
    assert aged is not None and aged.is_training  # waited >= max_training_wait: goes first
    assert [c.item.key for c in aged.chunks] == ["fwd"]


def test_full_queue_refuses_with_retry_hint() -> None:
    scheduler = BatchScheduler(max_queued_items=2)
    scheduler.submit(WorkItem(1, WorkKind.FORWARD, 10), now=0)
    scheduler.submit(WorkItem(2, WorkKind.FORWARD, 10), now=0)
    refusal = scheduler.submit(WorkItem(3, WorkKind.FORWARD, 10), now=0)
    assert refusal is not None and refusal.retry_after > 0
    assert len(scheduler) == 2


def test_one_queued_step_per_session_and_unique_keys() -> None:
    scheduler = BatchScheduler()
    scheduler.submit(WorkItem(1, WorkKind.INFERENCE, 1, "s"), now=0)
    with pytest.raises(ValueError, match="already has a step queued"):
        scheduler.submit(WorkItem(2, WorkKind.INFERENCE, 1, "s"), now=0)
    with pytest.raises(ValueError, match="already queued"):
        scheduler.submit(WorkItem(1, WorkKind.FORWARD, 1), now=0)


class SchedulerMachine(RuleBasedStateMachine):
    """Every submitted token is handed out exactly once, in order, within the batch budget."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = BatchScheduler(
            max_batch_tokens=32, prefill_chunk_tokens=8, max_queued_items=12, max_training_wait=3
        )
        self.now = 0.0
        self.next_key = 0
        self.submitted: dict[int, WorkItem] = {}
        self.handed: dict[int, int] = defaultdict(int)  # key -> tokens handed out so far
        self.cancelled: set[int] = set()

    @rule(
        kind=st.sampled_from(list(WorkKind)),
        tokens=st.integers(1, 40),
        session=st.integers(0, 5),
    )
    def submit(self, kind: WorkKind, tokens: int, session: int) -> None:
        busy = {i.session for k, i in self.submitted.items() if self._queued(k)}
        if kind is WorkKind.INFERENCE and session in busy:
            return
        key = self.next_key
        self.next_key += 1
        item = WorkItem(key, kind, tokens, session if kind is WorkKind.INFERENCE else None)
        if self.scheduler.submit(item, self.now) is None:
            self.submitted[key] = item

    @rule(dt=st.floats(0, 2))
    def run_batch(self, dt: float) -> None:
        self.now += dt
        had_inference = any(
            i.kind is WorkKind.INFERENCE and self._queued(k) for k, i in self.submitted.items()
        )
        batch = self.scheduler.next_batch(self.now)
        if batch is None:
            assert not any(self._queued(k) for k in self.submitted)
            return
        if batch.is_training:
            assert len(batch.chunks) == 1  # training runs alone, whatever its size
        else:
            assert batch.tokens <= 32
            assert all(c.item.kind is WorkKind.INFERENCE for c in batch.chunks)
        if batch.is_training and had_inference:
            assert self.now >= 3  # only an aged training request may jump ahead
        for chunk in batch.chunks:
            key = int(chunk.item.key)  # type: ignore[call-overload]
            assert chunk.offset == self.handed[key]  # in order, no gaps, no repeats
            self.handed[key] += chunk.tokens

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        queued = [k for k in self.submitted if self._queued(k) and self.handed[k] == 0]
        if queued:
            key = data.draw(st.sampled_from(queued))
            assert self.scheduler.cancel(key)
            self.cancelled.add(key)

    def _queued(self, key: int) -> bool:
        return key not in self.cancelled and self.handed[key] < self.submitted[key].tokens

    @invariant()
    def accounting(self) -> None:
        remaining = sum(
            item.tokens - self.handed[key]
            for key, item in self.submitted.items()
            if key not in self.cancelled
        )
        assert self.scheduler.queued_tokens == remaining
        assert len(self.scheduler) == sum(1 for k in self.submitted if self._queued(k))


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
