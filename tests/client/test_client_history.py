"""A hop's history is exactly the inputs its server's cache holds, after any rollbacks and
row reorders (checked against a row-by-row model of the server)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.client.history import History

BATCH = 3


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[int | None, list[int] | None, int]]:
    """(start_from_position or None, hypo_ids or None, new tokens) per step, valid in order."""
    out = []
    position = 0
    for _ in range(draw(st.integers(1, 8))):
        start = draw(st.one_of(st.none(), st.integers(0, position)))
        hypo = draw(st.one_of(st.none(), st.lists(st.integers(0, BATCH - 1), min_size=BATCH,
                                                  max_size=BATCH)))  # fmt: skip
        n = draw(st.integers(0 if start is not None and start < position else 1, 3))
        out.append((start, hypo, n))
        position = (position if start is None else start) + n
    return out


@settings(max_examples=300, deadline=None)
@given(script=steps())
def test_history_matches_the_servers_rows(script):
    history = History()
    rows: list[list[float]] = [[] for _ in range(BATCH)]  # what each cache row holds
    counter = 0.0
    for start, hypo, n in script:
        at = len(rows[0]) if start is None else start
        inputs = torch.arange(counter, counter + BATCH * n).reshape(BATCH, n, 1)
        counter += BATCH * n
        if hypo is not None:
            rows = [list(rows[source][:at]) for source in hypo]
        rows = [row[:at] + inputs[r, :, 0].tolist() for r, row in enumerate(rows)]
        history.record(at, torch.tensor(hypo) if hypo is not None else None, inputs)
        assert history.length == len(rows[0])
        if history.length:
            assert history.tensor()[:, :, 0].tolist() == rows
