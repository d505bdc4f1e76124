"""A fixed pool of KV-cache pages with reference counts and an O(1) free list.

A *page* holds the keys and values of ``page_size`` consecutive tokens for every block a server
hosts; the pool only deals in page ids ``0 .. capacity-1`` and knows nothing about tensors
(``kvcache/storage.py`` owns those). Pages are shared copy-on-write between sessions (prefix
sharing, forks), hence the reference counts: a page returns to the free list when its last holder
lets go.

The shape follows vLLM's block pool: one flat array of counts plus a free list, so allocation and
release are O(1) per page. Our free list is a LIFO stack (a Python list): a page freed a moment
ago is handed out first, which keeps recently touched memory warm. There is no prefix cache that
could revive a freed page, so the doubly linked queue vLLM needs for that is not needed here.

Allocation is all-or-nothing and never over-commits: ``allocate(n)`` returns ``None`` when fewer
than ``n`` pages are free and changes nothing.
"""

from __future__ import annotations

__all__ = ["PagePool"]


class PagePool:
    """Reference-counted pages ``0 .. capacity-1``.

    Misuse (freeing a free page, sharing a page nobody holds) is a bug in the caller and raises
    :class:`ValueError`; running out of pages is normal and answered with ``None``.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        # Invariant: len(_refcount) == capacity; _refcount[p] >= 0 for every page p.
        self._refcount: list[int] = [0] * num_pages
        # Invariant: _free holds exactly the pages p with _refcount[p] == 0, each once.
        # Reversed so that a fresh pool hands out pages 0, 1, 2, ... (nicer to debug).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Total number of pages, free or not."""
        return len(self._refcount)

    @property
    def num_free(self) -> int:
        """Pages that ``allocate`` can hand out right now."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages held by at least one owner (``capacity - num_free``)."""
        return len(self._refcount) - len(self._free)

    def refcount(self, page: int) -> int:
        """How many owners hold ``page`` (0 when it is free)."""
        self._check_id(page)
        return self._refcount[page]

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free pages, each with reference count 1; ``None`` if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcount[page] = 1
        return pages

    def incref(self, page: int) -> None:
        """Add an owner to a page that is already held (sharing); a free page cannot be revived."""
        self._check_id(page)
        if self._refcount[page] == 0:
            raise ValueError(f"page {page} is free; allocate pages instead of sharing free ones")
        self._refcount[page] += 1

    def decref(self, page: int) -> None:
        """Drop one owner; the page goes back to the free list when its count reaches 0."""
        self._check_id(page)
        count = self._refcount[page]
        if count == 0:
            raise ValueError(f"page {page} is already free")
        self._refcount[page] = count - 1
        if count == 1:
            self._free.append(page)

    def _check_id(self, page: int) -> None:
        if not 0 <= page < len(self._refcount):
            raise ValueError(f"page {page} is outside the pool (capacity {len(self._refcount)})")
