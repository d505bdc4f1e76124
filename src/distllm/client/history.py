"""What a hop's server holds in its cache, as the inputs that built it (torch, no IO).

A replacement server rebuilds a lost server's cache from these inputs, so they must describe
the session *as it is now*: every step rolls the rows back to its start position (forgetting
what came after), reorders them by its ``hypo_ids`` (row ``i`` continues from old row
``hypo_ids[i]``), then appends its new tokens -- exactly what the server does
(``protocol/span_session.py``).

Appending is O(new tokens): inputs are kept as a list of chunks, joined only when a rollback
or reorder needs it, or for a replay.
"""

from __future__ import annotations

import torch

__all__ = ["History"]


class History:
    """Inputs ``[batch, length, hidden]`` a hop received, by position."""

    def __init__(self, chunks: list[torch.Tensor] | None = None) -> None:
        # Invariant: every chunk is [batch, n_i, hidden] with the same batch and hidden;
        # length == sum(n_i).
        self._chunks: list[torch.Tensor] = [c for c in chunks or [] if c.shape[1]]
        self.length = sum(c.shape[1] for c in self._chunks)

    def record(self, start: int, hypo_ids: torch.Tensor | None, inputs: torch.Tensor) -> None:
        """A step at ``start`` with ``hypo_ids`` and ``inputs`` ``[b, n, h]`` succeeded."""
        if not 0 <= start <= self.length:
            raise ValueError(f"start {start} is beyond the history's {self.length} positions")
        if start < self.length or (hypo_ids is not None and start):
            kept = self.tensor()[:, :start]
            if hypo_ids is not None and kept.shape[1]:
                kept = kept.index_select(0, hypo_ids.to(torch.int64))
            self._chunks = [kept] if start else []
            self.length = start
        if inputs.shape[1]:
            self._chunks.append(inputs)
            self.length += inputs.shape[1]

    def copy(self) -> History:
        """A snapshot: later records do not change it (chunks are never modified in place)."""
        return History(self._chunks)

    def tensor(self) -> torch.Tensor:
        """All inputs, ``[b, length, h]`` (empty chunk list: an error, there is no shape)."""
        if not self._chunks:
            raise ValueError("the history is empty")
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks, dim=1)]
        return self._chunks[0]

    def __repr__(self) -> str:
        return f"History({self.length} positions)"
