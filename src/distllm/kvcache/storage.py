"""Torch storage of K/V pages for the blocks of one span.

For every block the keys and the values each live in one tensor of shape
``[num_pages, page_size, num_kv_heads, head_dim]``, allocated once. Page ids come from
:class:`~distllm.kvcache.pool.PagePool`; a page id names the same rows in every block's tensors,
so one page table per session serves the whole span.

Reads and writes go through *slots*: viewed flat as ``[num_pages * page_size, ...]``, token ``i``
of a session sits in row ``pages[i // page_size] * page_size + i % page_size``. Writing scatters
the new tokens' K/V into their rows; reading gathers a session's rows back into token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PagedKVStorage", "slot_index"]


def slot_index(
    pages: Sequence[int], page_size: int, start: int, end: int, device: torch.device | None = None
) -> torch.Tensor:
    """Storage rows of tokens ``[start, end)`` of a session whose pages are ``pages``."""
    first, last = start // page_size, -(-end // page_size)
    page_ids = torch.tensor(pages[first:last], dtype=torch.long, device=device)
    offsets = torch.arange(page_size, dtype=torch.long, device=device)
    rows = (page_ids[:, None] * page_size + offsets[None, :]).reshape(-1)  # [n_pages * page_size]
    skip = start - first * page_size
    return rows[skip : skip + end - start]


class PagedKVStorage:
    """K/V page tensors of ``num_layers`` blocks (indices local to the span: 0 .. num_layers-1)."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # Zero-filled so that a padded read of an unwritten row can never produce NaN/inf.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype if self.keys else torch.float32

    @property
    def bytes_per_page(self) -> int:
        """Memory one page costs across all blocks (keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * element

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.num_pages * self.page_size
        # [num_pages, page_size, kv_heads, head_dim] -> [num_pages * page_size, kv_heads, head_dim]
        key = self.keys[layer].view(rows, self.num_kv_heads, self.head_dim)
        value = self.values[layer].view(rows, self.num_kv_heads, self.head_dim)
        return key, value

    def write(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store ``key``/``value`` ``[n, kv_heads, head_dim]`` at storage rows ``slots`` ``[n]``."""
        flat_key, flat_value = self._flat(layer)
        flat_key.index_copy_(0, slots, key.to(flat_key.dtype))
        flat_value.index_copy_(0, slots, value.to(flat_value.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at rows ``slots`` (any shape ``S``), shaped ``[*S, kv_heads, head_dim]``."""
        flat_key, flat_value = self._flat(layer)
        # index_select on the flattened slots: a few times faster than advanced indexing on CPU
        flat_slots = slots.reshape(-1)
        shape = (*slots.shape, self.num_kv_heads, self.head_dim)
        return (
            flat_key.index_select(0, flat_slots).view(shape),
            flat_value.index_select(0, flat_slots).view(shape),
        )

    def rows(self, layer: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the consecutive rows ``first .. end-1`` as views ``[1, end-first, kv_heads,
        head_dim]`` (no copy)."""
        flat_key, flat_value = self._flat(layer)
        return flat_key[first:end][None], flat_value[first:end][None]

    def copy_pages(self, copies: Sequence[tuple[int, int]]) -> None:
        """For each ``(src, dst)`` copy page ``src`` into page ``dst`` in every block (COW)."""
        if not copies:
            return
        device = self.keys[0].device if self.keys else None
        src = torch.tensor([c[0] for c in copies], dtype=torch.long, device=device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.long, device=device)
        for tensor in (*self.keys, *self.values):
            tensor.index_copy_(0, dst, tensor.index_select(0, src))
