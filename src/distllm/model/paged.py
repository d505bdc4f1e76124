"""One batched inference step over the paged KV cache: its plan, and the cache the blocks see.

A step carries new tokens of several sessions, each at its own position with its own page table.
Their hidden states are flattened into one ragged row ``[1, T, hidden]`` (``T`` = all new tokens),
so every projection and MLP runs once for the whole step, with no padding. Only attention needs
to know which tokens belong together; :class:`PagedStep` holds that knowledge as index tensors
built once per step and shared by all blocks:

* ``write_slots`` -- the storage row of every new token (its K/V is scattered there);
* *grouped* attention (families that call transformers' attention interface, see
  :mod:`distllm.model.attention`): sessions adding the same number of tokens form a group whose
  prefixes are gathered from the pages into ``[B, kv_heads, L_max, head_dim]`` and attended in a
  single SDPA call with a per-session causal mask. A decode step of B sessions is one group: its
  cost is ``B x L_max``, not the ``B x sum(L)`` of a block-diagonal mask.
* *concat* attention (BLOOM, Falcon: their blocks compute attention themselves over whatever the
  cache returns): the prefixes of all sessions are concatenated into ``[1, kv_heads, K, head_dim]``
  and a block-diagonal causal mask ``[1, 1, T, K]`` keeps sessions apart -- the layout of
  transformers' continuous batching for eager/SDPA. Correct for any block, quadratic in the number
  of sessions.

:class:`PagedLayerCache` is what a transformers block receives as its ``cache``/``layer_past``: it
implements the one method blocks call, ``update(key, value, layer_idx, ...)``, by writing the new
K/V into the pages and returning what attention should read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distllm.kvcache.storage import PagedKVStorage, slot_index

__all__ = ["AttentionGroup", "PagedLayerCache", "PagedStep", "SessionSlice", "build_step"]


@dataclass(frozen=True)
class SessionSlice:
    """One session's part of a step: ``num_new`` tokens starting at ``start`` over ``pages``."""

    start: int
    num_new: int
    pages: Sequence[int]

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass
class AttentionGroup:
    """Sessions of a step that add the same number of tokens ``t`` (grouped attention)."""

    query_index: torch.Tensor  # [B, t] rows of the flattened step
    query_positions: torch.Tensor  # [B, t] absolute positions of those tokens
    key_slots: torch.Tensor  # [B, L_max] storage rows of each prefix, padded with row 0
    key_lengths: torch.Tensor  # [B] valid keys per session (its length after the step)
    #: ``(first, end)`` when the group is one session whose keys fill consecutive storage rows
    #: (its pages are consecutive): they are then read as a slice, not gathered row by row.
    key_rows: tuple[int, int] | None = None
    #: Whether the group's queries are the step's rows ``0 .. B*t-1`` in order (one session
    #: alone in the step): its output then needs no scatter.
    covers_step: bool = False
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean ``[B, 1, t, L_max]``: True where a query may attend a key (cached per window);
        ``None`` when every query may attend every key (a decode step within the window)."""
        if sliding_window not in self._masks:
            key_pos = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
            query_pos = self.query_positions[:, :, None]  # [B, t, 1]
            allowed = (key_pos <= query_pos) & (key_pos < self.key_lengths[:, None, None])
            if sliding_window is not None:
                allowed &= key_pos > query_pos - sliding_window
            full = bool(allowed.all())
            self._masks[sliding_window] = None if full else allowed[:, None]  # -> [B, 1, t, L]
        return self._masks[sliding_window]

    def read(self, storage: PagedKVStorage, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's keys and values ``[B, L_max, kv_heads, head_dim]`` in ``layer``."""
        if self.key_rows is not None:
            return storage.rows(layer, *self.key_rows)
        return storage.gather(layer, self.key_slots)


@dataclass
class PagedStep:
    """Index tensors of one step, shared by every block of the span."""

    storage: PagedKVStorage
    first_layer: int  # global index of the span's first block (blocks know their global index)
    write_slots: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    # Grouped mode: one entry per distinct number of new tokens.
    groups: list[AttentionGroup] = field(default_factory=list)
    # Concat mode: every session's prefix, one after another ([K]), the position of each key
    # within its session ([K]), and which query may attend which key ([T, K]).
    read_slots: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    _additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Concat mode mask as an additive bias ``[1, 1, T, K]`` (0 or the dtype's minimum)."""
        if self.allowed is None:
            raise ValueError("additive_mask is only defined for concat attention")
        if dtype not in self._additive:
            bias = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            bias.masked_fill_(~self.allowed, torch.finfo(dtype).min)
            self._additive[dtype] = bias[None, None]  # [T, K] -> [1, 1, T, K]
        return self._additive[dtype]


def build_step(
    storage: PagedKVStorage,
    first_layer: int,
    sessions: Sequence[SessionSlice],
    concat: bool,
    device: torch.device | None = None,
) -> PagedStep:
    """Plan a step for ``sessions`` (in the order their tokens are flattened)."""
    page_size = storage.page_size
    offsets: list[int] = []
    total = 0
    for s in sessions:
        offsets.append(total)
        total += s.num_new
    write_slots = torch.cat(
        [slot_index(s.pages, page_size, s.start, s.end, device) for s in sessions]
    )
    position_ids = torch.cat(
        [torch.arange(s.start, s.end, dtype=torch.long, device=device) for s in sessions]
    )
    step = PagedStep(storage, first_layer, write_slots, position_ids)
    if not concat:
        step.groups = _groups(sessions, offsets, page_size, device)
        return step
    read_slots = torch.cat([slot_index(s.pages, page_size, 0, s.end, device) for s in sessions])
    key_positions = torch.cat([torch.arange(s.end, device=device) for s in sessions])
    # Which session each key and each query belongs to: keys only serve their own session.
    key_session = torch.cat(
        [torch.full((s.end,), i, device=device) for i, s in enumerate(sessions)]
    )
    query_session = torch.cat(
        [torch.full((s.num_new,), i, device=device) for i, s in enumerate(sessions)]
    )
    allowed = (query_session[:, None] == key_session[None, :]) & (
        key_positions[None, :] <= position_ids[:, None]
    )  # [T, K]
    step.read_slots, step.key_positions, step.allowed = read_slots, key_positions, allowed
    return step


def _groups(
    sessions: Sequence[SessionSlice],
    offsets: Sequence[int],
    page_size: int,
    device: torch.device | None,
) -> list[AttentionGroup]:
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sessions):
        by_length.setdefault(s.num_new, []).append(i)
    groups = []
    for t, members in by_length.items():
        longest = max(sessions[i].end for i in members)
        key_slots = torch.zeros((len(members), longest), dtype=torch.long, device=device)
        for row, i in enumerate(members):
            s = sessions[i]
            key_slots[row, : s.end] = slot_index(s.pages, page_size, 0, s.end, device)
        steps = torch.arange(t, dtype=torch.long, device=device)
        starts = torch.tensor([sessions[i].start for i in members], device=device)
        rows = torch.tensor([offsets[i] for i in members], device=device)
        alone = len(members) == 1
        groups.append(
            AttentionGroup(
                query_index=rows[:, None] + steps[None, :],
                query_positions=starts[:, None] + steps[None, :],
                key_slots=key_slots,
                key_lengths=starts + t,
                key_rows=_consecutive_rows(sessions[members[0]], page_size) if alone else None,
                covers_step=alone and len(sessions) == 1,
            )
        )
    return groups


def _consecutive_rows(session: SessionSlice, page_size: int) -> tuple[int, int] | None:
    """Storage rows ``(first, end)`` of the session's keys ``0 .. end-1``, if consecutive."""
    used = session.pages[: -(-session.end // page_size)]
    if any(b != a + 1 for a, b in itertools.pairwise(used)):
        return None
    first = used[0] * page_size
    return first, first + session.end


class PagedLayerCache:
    """Duck-typed stand-in for ``transformers.Cache`` during one paged step.

    Blocks call ``update`` once per forward with the new tokens' K/V, shaped
    ``[1, kv_heads, T, head_dim]``; the K/V are stored in the pages at the step's slots. In grouped
    mode the new K/V are returned unchanged (the attention function reads the prefixes from the
    pages itself); in concat mode every session's whole prefix is returned.
    """

    def __init__(self, step: PagedStep) -> None:
        self.step = step

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        layer = layer_idx - step.first_layer
        # [1, kv_heads, T, head_dim] -> [T, kv_heads, head_dim]
        new_key, new_value = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        step.storage.write(layer, step.write_slots, new_key, new_value)
        if step.read_slots is None:
            return key_states, value_states
        key, value = step.storage.gather(layer, step.read_slots)  # [K, kv_heads, head_dim]
        # [K, kv_heads, head_dim] -> [1, kv_heads, K, head_dim]
        return key.transpose(0, 1)[None], value.transpose(0, 1)[None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest session after the step (only consulted by code paths we do not take)."""
        return int(self.step.position_ids.max().item()) + 1
