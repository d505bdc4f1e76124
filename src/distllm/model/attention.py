"""Our entry in transformers' attention interface: dense causal attention, or attention over pages.

Decoder layers of the Llama family (Llama, Mistral, Qwen2, Mixtral, ...) compute Q/K/V, apply
rotary embeddings, call ``cache.update`` and then whatever function
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` names, passing their extra keyword
arguments through. We register :func:`distllm_attention` under :data:`ATTENTION_NAME` and set the
span's config to it, so the HF layer stays untouched:

* without a ``distllm_paged`` keyword (stateless forward, also used for training) it is causal
  SDPA over the given K/V, with the layer's sliding window if any;
* with ``distllm_paged=PagedStep`` (a paged inference step) it attends each group of sessions over
  its prefix gathered from the pages (see :mod:`distllm.model.paged`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from distllm.model.paged import PagedStep

__all__ = ["ATTENTION_NAME", "distllm_attention", "register_attention"]

ATTENTION_NAME = "distllm_paged"


def register_attention() -> None:
    """Make :data:`ATTENTION_NAME` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, distllm_attention)


def distllm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, T, head_dim]
    key: torch.Tensor,  # [b, kv_heads, S, head_dim]
    value: torch.Tensor,  # [b, kv_heads, S, head_dim]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    distllm_paged: PagedStep | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' layers; returns ``([b, T, heads, head_dim], None)``."""
    if distllm_paged is not None:
        return _paged(module, query, scaling, sliding_window, distllm_paged), None
    # Stateless: queries and keys are the same positions 0 .. T-1 (no cache).
    gqa = query.shape[1] != key.shape[1]
    length = key.shape[2]
    if attention_mask is None and sliding_window is not None and sliding_window < length:
        pos = torch.arange(length, device=query.device)
        attention_mask = (pos[None, :] <= pos[:, None]) & (
            pos[None, :] > pos[:, None] - sliding_window
        )  # [T, T]: causal, at most `sliding_window` keys back
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=attention_mask is None and query.shape[2] > 1,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2).contiguous(), None  # [b, heads, T, d] -> [b, T, heads, d]


def _paged(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim]
    scaling: float | None,
    sliding_window: int | None,
    step: PagedStep,
) -> torch.Tensor:
    layer_idx: int = module.layer_idx  # type: ignore[assignment]  # set by every HF attention
    layer = layer_idx - step.first_layer
    heads, total, head_dim = query.shape[1:]
    flat_query = query[0]  # [heads, T, head_dim]
    out = query.new_empty((total, heads, head_dim))
    for group in step.groups:
        key, value = group.read(step.storage, layer)  # [B, L, kv_heads, head_dim]
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # [B, kv_heads, L, head_dim]
        if group.covers_step:  # one session: its queries are the step's, in order
            group_query = query  # [1, heads, T, head_dim]
        else:
            group_query = flat_query[:, group.query_index].transpose(0, 1)  # [B, heads, t, d]
        attended = F.scaled_dot_product_attention(
            group_query,
            key,
            value,
            attn_mask=group.mask(sliding_window),
            scale=scaling,
            enable_gqa=heads != key.shape[1],
        )
        # [B, heads, t, head_dim] -> [B * t, heads, head_dim], scattered back to the step's rows
        rows = attended.transpose(1, 2).reshape(-1, heads, head_dim)
        if group.covers_step:
            return rows[None]  # [T, heads, head_dim] -> [1, T, heads, head_dim]
        out[group.query_index.reshape(-1)] = rows
    return out[None]  # [T, heads, head_dim] -> [1, T, heads, head_dim]
