"""What a ``transformers`` 2D ``attention_mask`` means for the swarm: left padding per row.

Batches of prompts reach ``generate`` left-padded (``tokenizer.padding_side = "left"``); the
servers skip each row's leading pad tokens (``InferenceStep.padding``), so the mask itself never
travels. A mask of any other shape (holes, right padding in a session) cannot be expressed that
way and is refused with ``ValueError``.
"""

from __future__ import annotations

import torch

__all__ = ["left_padding", "real_spans"]


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
