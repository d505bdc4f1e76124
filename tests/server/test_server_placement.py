from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.server.placement import ServedSpan, block_throughputs, choose_start, plan_move


def test_newcomer_fills_the_uncovered_blocks() -> None:
    spans = [ServedSpan("a", 0, 4, 10.0), ServedSpan("b", 6, 10, 10.0)]
    assert choose_start(10, 2, spans) == 4
    assert choose_start(10, 3, spans) == 3  # [3, 6): covers both holes, lowest start on ties


def test_newcomer_picks_the_weakest_window() -> None:
    spans = [ServedSpan("a", 0, 5, 10.0), ServedSpan("b", 5, 10, 2.0)]
    assert choose_start(10, 5, spans) == 5


@given(
    num_blocks=st.integers(1, 9),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_choose_start_matches_brute_force(num_blocks: int, data: st.DataObject) -> None:
    spans = []
    for i in range(data.draw(st.integers(0, 5))):
        start = data.draw(st.integers(0, num_blocks - 1))
        end = data.draw(st.integers(start + 1, num_blocks))
        spans.append(ServedSpan(i, start, end, data.draw(st.sampled_from([0.5, 1.0, 2.0, 3.0]))))
    length = data.draw(st.integers(1, num_blocks))
    totals = block_throughputs(num_blocks, spans)
    best = min((sorted(totals[s : s + length]), s) for s in range(num_blocks - length + 1))[1]
    assert choose_start(num_blocks, length, spans) == best
    # The chosen window always contains a weakest block of the swarm.
    assert min(totals[best : best + length]) == min(totals)


def test_moves_only_for_a_clear_gain() -> None:
    me = ServedSpan("me", 0, 2, 10.0)
    crowded = [me, ServedSpan("x", 0, 2, 10.0), ServedSpan("y", 2, 4, 1.0)]
    assert plan_move(4, me, crowded) == 2  # bottleneck 1 -> 10
    slight = [me, ServedSpan("x", 0, 2, 10.0), ServedSpan("y", 2, 4, 9.0)]
    assert plan_move(4, me, slight) is None  # 9 -> 10 is below the 1.33 gain


def test_never_orphans_a_block() -> None:
    me = ServedSpan("me", 0, 2, 10.0)
    spans = [me, ServedSpan("y", 2, 4, 1.0)]  # only we serve blocks 0-1
    assert plan_move(4, me, spans) is None


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_a_planned_move_never_lowers_the_bottleneck(data: st.DataObject) -> None:
    num_blocks = data.draw(st.integers(2, 8))
    spans = []
    for i in range(data.draw(st.integers(1, 5))):
        start = data.draw(st.integers(0, num_blocks - 1))
        end = data.draw(st.integers(start + 1, num_blocks))
        spans.append(ServedSpan(i, start, end, data.draw(st.floats(0.1, 10))))
    me = spans[0]
    target = plan_move(num_blocks, me, spans)
    before = block_throughputs(num_blocks, spans)
    if target is None:
        return
    moved = ServedSpan(me.peer, target, target + (me.end - me.start), me.throughput)
    after = block_throughputs(num_blocks, [moved, *spans[1:]])
    assert min(after) >= min(before) * 1.33 or min(before) == 0 < min(after)
    # every block covered before is still covered after
    for before_b, after_b in itertools.zip_longest(before, after):
        assert not (before_b > 0 and after_b == 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="span must satisfy"):
        ServedSpan("a", 3, 3, 1.0)
    with pytest.raises(ValueError, match="throughput must be >= 0"):
        ServedSpan("a", 0, 1, float("nan"))
    with pytest.raises(ValueError, match=r"span_length must be in 1\.\.4"):
        choose_start(4, 5, [])
