"""A span ``[start, end)`` of a decoder's blocks: stateless forward and batched paged steps.

Build one with :func:`distllm.model.load_span`. The blocks are transformers' own modules; the
span only computes what the full model would pass them (positions, rotary cos/sin or ALiBi,
masks) and, for inference, a cache that reads and writes pages (see :mod:`distllm.model.paged`).

* :meth:`SpanModel.forward` -- ``[b, T, h] -> [b, T, h]``, causal from position 0, no cache;
  differentiable w.r.t. its input (the weights are frozen). Optional deep prompts.
* :meth:`SpanModel.step` -- one batched inference step over several sessions of different
  lengths: new tokens of all sessions run as one ragged batch; each session attends over its own
  cached prefix. ``start_position`` below a session's length rolls it back first.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from distllm.kvcache.table import WriteRequest
from distllm.model.errors import CacheFull
from distllm.model.families import Family
from distllm.model.paged import SessionSlice, build_step

if TYPE_CHECKING:
    from distllm.model.kv import PagedKVCache

__all__ = ["SpanModel", "StepInput"]


@dataclass(frozen=True)
class StepInput:
    """New tokens of one session: ``hidden`` ``[t, hidden_size]``, the first at ``start_position``.

    ``start_position`` equal to the session's cached length continues it; a smaller value rolls
    the session back to that position first (its later tokens are forgotten); a larger one is an
    error.
    """

    session_id: Hashable
    hidden: torch.Tensor
    start_position: int


def _hidden_of(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    # Llama-style layers return the hidden states, BLOOM/Falcon a tuple starting with them.
    return output[0] if isinstance(output, tuple) else output


class SpanModel(nn.Module):
    """Blocks ``[start, end)`` of one model, with frozen weights, in eval mode."""

    def __init__(
        self,
        config: PretrainedConfig,
        family: Family,
        start: int,
        blocks: Sequence[nn.Module],
        positional: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.family = family
        self.start = start
        self.end = start + len(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.positional = positional
        self.requires_grad_(False)
        self.eval()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the K/V cached per token and block."""
        return self.family.kv_shape(self.config)

    @property
    def dtype(self) -> torch.dtype:
        # The compute dtype: quantized weights (int8/uint8, see quantize.py) are not it.
        return next(p.dtype for p in self.blocks.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.blocks.parameters()).device

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks causally over ``hidden`` ``[b, T, h]`` from position 0.

        ``prompts`` (deep prompt tuning), ``[num_blocks, b or 1, pre_seq_len, h]``: before block
        ``i``, ``prompts[i]`` is added to the first ``pre_seq_len`` positions.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"expected hidden [b, T, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if prompts is not None and (
            prompts.dim() != 4
            or prompts.shape[0] != self.num_blocks
            or prompts.shape[2] > hidden.shape[1]
        ):
            raise ValueError(f"prompts {tuple(prompts.shape)} do not fit this span and input")
        hidden = hidden.to(self.device, self.dtype)
        kwargs = self.family.dense_kwargs(hidden, self.positional)
        for i, block in enumerate(self.blocks):
            if prompts is not None:
                size = prompts.shape[2]
                prompted = hidden[:, :size] + prompts[i].to(hidden.dtype)
                hidden = torch.cat([prompted, hidden[:, size:]], dim=1)
            hidden = _hidden_of(block(hidden, **kwargs))
        return hidden

    def step(self, cache: PagedKVCache, inputs: Sequence[StepInput]) -> list[torch.Tensor]:
        """One batched inference step; returns each session's outputs ``[t_i, h]`` in order.

        Writes the new tokens' K/V into ``cache`` and attends over each session's prefix. Raises
        :class:`~distllm.model.errors.CacheFull` (nothing changed) when the pages do not suffice.
        """
        if not inputs:
            return []
        if cache.storage.num_layers != self.num_blocks:
            raise ValueError("this cache was not built for this span")
        for item in inputs:
            if item.hidden.dim() != 2 or item.hidden.shape[1] != self.hidden_size:
                raise ValueError(
                    f"session {item.session_id!r}: expected hidden [t, {self.hidden_size}], "
                    f"got {tuple(item.hidden.shape)}"
                )
            if item.hidden.shape[0] == 0:
                raise ValueError(f"session {item.session_id!r}: a step needs at least one token")
        manager = cache.manager
        requests = [
            WriteRequest(i.session_id, i.start_position, i.start_position + i.hidden.shape[0])
            for i in inputs
        ]
        copies = manager.begin_writes(requests)
        if copies is None:
            raise CacheFull(sum(r.end - r.start for r in requests), manager.free_tokens)
        try:
            cache.storage.copy_pages(copies)
            sessions = [
                SessionSlice(r.start, r.end - r.start, manager.pages(r.session_id))
                for r in requests
            ]
            step = build_step(
                cache.storage,
                self.start,
                sessions,
                self.family.attention == "concat",
                self.device,
            )
            # [t_i, h] each -> [1, T, h]: every session's tokens in one ragged row
            hidden = torch.cat([i.hidden for i in inputs]).to(self.device, self.dtype)[None]
            with torch.no_grad():
                kwargs = self.family.paged_kwargs(hidden, self.positional, step)
                for block in self.blocks:
                    hidden = _hidden_of(block(hidden, **kwargs))
        except BaseException:
            # The new tokens' K/V may be half written: forget them, keep the prefixes.
            for r in requests:
                manager.truncate(r.session_id, r.start)
            raise
        sizes = [r.end - r.start for r in requests]
        return list(torch.split(hidden[0], sizes))
