"""Paged KV cache: a pure page pool and page tables (L1), plus torch page storage (side layer).

Only the pure parts are imported here, so ``import distllm.kvcache`` stays free of torch; the
tensor storage lives in :mod:`distllm.kvcache.storage`.
"""

from __future__ import annotations

from distllm.kvcache.pool import PagePool
from distllm.kvcache.table import CacheManager, PageCopy, PageTable, WriteRequest, pages_for

__all__ = ["CacheManager", "PageCopy", "PagePool", "PageTable", "WriteRequest", "pages_for"]
