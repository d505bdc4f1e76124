"""What a ``transformers`` 2D ``attention_mask`` means for the swarm: left padding per row.

Batches of prompts reach ``generate`` left-padded (``tokenizer.padding_side = "left"``); the
servers skip each row's leading pad tokens (``InferenceStep.padding``), so the mask itself never
travels. A mask of any other shape (holes, right padding in a session) cannot be expressed that
way and is refused with ``ValueError``.

A prompt-tuned model puts its prefix right after each row's leading pads (:func:`insert_prefix`):
the prefix is made of real tokens, so a left-padded row stays "zeros, then ones" and the prefix
takes the row's own positions ``0 .. pre_seq_len-1``, where the deep prompts are added.
"""

from __future__ import annotations

import torch

__all__ = ["drop_prefix", "insert_prefix", "leading_pads", "left_padding", "real_spans"]


def _ones_after_lead(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: leading zeros, and how many ones follow them in a single run."""
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2D [batch, length], got {tuple(mask.shape)}")
    keep = mask != 0  # [B, L]
    lead = (keep.cumsum(dim=1) == 0).sum(dim=1)  # [B] zeros before the first one
    positions = torch.arange(mask.shape[1], device=mask.device)
    after = positions[None, :] >= lead[:, None]  # [B, L]
    # ones in one run from `lead` on: a cumulative product stops at the first zero after it
    run = (keep | ~after).to(torch.int8).cumprod(dim=1).sum(dim=1) - lead  # [B]
    return lead, run


def left_padding(mask: torch.Tensor | None) -> tuple[int, ...] | None:
    """Leading pad tokens per row of a left-padded ``mask`` ``[B, L]``; ``None`` for no mask or
    no padding. Raises ``ValueError`` unless every row is zeros then ones (a row of zeros only
    too: it has no token to generate from)."""
    if mask is None:
        return None
    lead, run = _ones_after_lead(mask)
    length = mask.shape[1]
    if bool(((lead + run) != length).any()) or bool((run == 0).any()):
        raise ValueError(
            "attention_mask must be left padding (zeros, then ones, at least one per row); "
            "set tokenizer.padding_side = 'left'"
        )
    padding = tuple(int(n) for n in lead)
    return padding if any(padding) else None


def real_spans(mask: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int]]:
    """``(first, end)`` of each row's real tokens for a full forward: leading pads are cut, and
    trailing pads may stay (causal attention never lets a real token see them). ``ValueError``
    for a mask with holes."""
    if mask is None:
        return [(0, length)] * batch
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask is {tuple(mask.shape)}; input_ids is {(batch, length)}")
    lead, run = _ones_after_lead(mask)
    trailing_ok = mask.ne(0).sum(dim=1) == run  # no one after the first run of ones
    if not bool(trailing_ok.all()) or bool((run == 0).any()):
        raise ValueError("attention_mask must be ones with padding only at the start or end")
    return [(int(first), length) for first in lead]


def leading_pads(mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Leading zeros of each row of ``mask`` ``[batch, L]`` (int64 ``[batch]``; zeros when
    ``mask`` is ``None``)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    lead, _ = _ones_after_lead(mask)
    return lead.to("cpu", torch.long)


def _prefix_index(lead: torch.Tensor, length: int, prefix_len: int) -> torch.Tensor:
    """``[b, length + prefix_len]`` indices into ``cat([x, prefix], 1)`` (``x`` ``[b, length]``)
    that put the prefix after each row's ``lead`` pads."""
    j = torch.arange(length + prefix_len)[None, :]  # [1, L+P]
    start = lead[:, None]  # [b, 1]
    in_prefix = (j >= start) & (j < start + prefix_len)
    after = j >= start + prefix_len
    return torch.where(in_prefix, length + (j - start), torch.where(after, j - prefix_len, j))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[r, index[r, j], ...]`` for ``x`` ``[b, L, ...]`` (differentiable)."""
    index = index.to(x.device)
    shape = (*index.shape, *x.shape[2:])
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, index)


def insert_prefix(x: torch.Tensor, prefix: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """Row ``r`` of ``x`` ``[b, L, ...]`` with ``prefix[r]`` (``prefix``: ``[b, P, ...]``)
    inserted after its first ``lead[r]`` positions: ``[b, P + L, ...]``."""
    if prefix.shape[0] != x.shape[0] or prefix.shape[2:] != x.shape[2:]:
        raise ValueError(f"a prefix {tuple(prefix.shape)} does not fit {tuple(x.shape)}")
    index = _prefix_index(lead, x.shape[1], prefix.shape[1])
    return _gather_rows(torch.cat([x, prefix.to(x.dtype)], dim=1), index)


def drop_prefix(x: torch.Tensor, lead: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """The inverse of :func:`insert_prefix`: ``[b, P + L, ...]`` -> ``[b, L, ...]``."""
    length = x.shape[1] - prefix_len
    j = torch.arange(length)[None, :]  # [1, L]
    index = torch.where(j >= lead[:, None], j + prefix_len, j)  # [b, L]
    return _gather_rows(x, index)
