"""The paged KV cache of one span: page storage for its blocks plus the session page tables."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from distllm.kvcache.pool import PagePool
from distllm.kvcache.storage import PagedKVStorage
from distllm.kvcache.table import CacheManager
from distllm.model.span import SpanModel

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """``num_pages`` pages of ``page_size`` tokens, each holding K/V for every block of ``span``.

    Sessions are opened, forked and closed here; :meth:`SpanModel.step` grows and rolls them
    back. Memory is allocated once, up front (``bytes_per_page * num_pages``); sessions take pages
    as they grow.
    """

    def __init__(
        self,
        span: SpanModel,
        num_pages: int,
        page_size: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        kv_heads, head_dim = span.kv_shape
        self.storage = PagedKVStorage(
            span.num_blocks,
            num_pages,
            page_size,
            kv_heads,
            head_dim,
            span.dtype,
            device if device is not None else span.device,
        )
        self.manager = CacheManager(PagePool(num_pages), page_size)

    @staticmethod
    def pages_for_bytes(span: SpanModel, num_bytes: int, page_size: int = 16) -> int:
        """How many pages a memory budget of ``num_bytes`` buys for ``span``."""
        kv_heads, head_dim = span.kv_shape
        element = torch.empty((), dtype=span.dtype).element_size()
        per_page = 2 * span.num_blocks * page_size * kv_heads * head_dim * element
        return num_bytes // per_page

    @property
    def page_size(self) -> int:
        return self.manager.page_size

    @property
    def num_pages(self) -> int:
        return self.manager.pool.capacity

    @property
    def free_tokens(self) -> int:
        """Tokens that sessions can still grow by."""
        return self.manager.free_tokens

    def __contains__(self, session_id: object) -> bool:
        return session_id in self.manager

    def open(self, session_id: Hashable) -> None:
        """Start an empty session (it takes no memory until its first step)."""
        self.manager.open(session_id)

    def fork(self, src: Hashable, dst: Hashable, length: int) -> None:
        """Open ``dst`` sharing the first ``length`` cached tokens of ``src`` (copy-on-write)."""
        self.manager.fork(src, dst, length)

    def close(self, session_id: Hashable) -> None:
        """Release the session's pages."""
        self.manager.close(session_id)

    def length(self, session_id: Hashable) -> int:
        """Tokens cached for the session."""
        return self.manager.length(session_id)
