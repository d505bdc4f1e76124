"""Which blocks a server should host (pure: no IO; the swarm view comes in as data).

A joining server takes the window of consecutive blocks that the swarm serves worst: the window
whose announced per-block throughputs, sorted ascending, are lexicographically smallest — so an
uncovered block (throughput 0) is always taken first, then the weakest one, and so on.

Later, a server re-runs the choice against the swarm without its own contribution and moves
only when that raises the swarm's bottleneck (the minimum block throughput) by at least the
factor ``min_gain`` (Petals uses ~1.33: moving restarts the server and costs its sessions), and
never when moving would leave a block it now serves uncovered.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ServedSpan", "block_throughputs", "choose_start", "plan_move"]


@dataclass(frozen=True, slots=True)
class ServedSpan:
    """One server's announced span ``[start, end)`` and its per-block throughput."""

    peer: Hashable
    start: int
    end: int
    throughput: float

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        if not self.throughput >= 0:  # also rejects NaN
            raise ValueError(f"throughput must be >= 0, got {self.throughput!r}")


def block_throughputs(num_blocks: int, spans: Iterable[ServedSpan]) -> list[float]:
    """Total announced throughput of every block; spans reaching past the model are clipped."""
    totals = [0.0] * num_blocks
    for span in spans:
        for block in range(span.start, min(span.end, num_blocks)):
            totals[block] += span.throughput
    return totals


def choose_start(num_blocks: int, span_length: int, spans: Iterable[ServedSpan]) -> int:
    """First block of the best window of ``span_length`` blocks for a newcomer.

    Ties go to the lowest start, so the choice is deterministic for a given swarm view.
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span_length must be in 1..{num_blocks}, got {span_length!r}")
    totals = block_throughputs(num_blocks, spans)
    return min(
        range(num_blocks - span_length + 1),
        key=lambda start: (sorted(totals[start : start + span_length]), start),
    )


def plan_move(
    num_blocks: int,
    me: ServedSpan,
    spans: Sequence[ServedSpan],
    *,
    min_gain: float = 1.33,
) -> int | None:
    """The start a server should move to, or ``None`` to stay.

    ``spans`` is the swarm as announced and may include ``me`` (matched by ``peer``).
    """
    if min_gain < 1:
        raise ValueError(f"min_gain must be >= 1, got {min_gain!r}")
    others = [span for span in spans if span.peer != me.peer]
    length = me.end - me.start
    current = min(block_throughputs(num_blocks, [*others, me]))
    without_me = block_throughputs(num_blocks, others)
    # Moving must not orphan a block: every block we serve needs another server, unless the
    # new window still covers it.
    start = choose_start(num_blocks, length, others)
    if start == me.start:
        return None
    new_window = range(start, start + length)
    orphaned = [
        b
        for b in range(me.start, min(me.end, num_blocks))
        if without_me[b] == 0 and b not in new_window
    ]
    if orphaned:
        return None
    moved = ServedSpan(me.peer, start, start + length, me.throughput)
    after = min(block_throughputs(num_blocks, [*others, moved]))
    if current > 0 and after < current * min_gain:
        return None
    if current == 0 and after == 0:
        return None  # still a hole somewhere we cannot fill by moving: stay put
    return start
