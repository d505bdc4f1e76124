"""Per-session page tables over a shared :class:`~distllm.kvcache.pool.PagePool`.

A session's tokens live in pages of ``page_size`` tokens: token ``i`` sits in page
``pages[i // page_size]`` at offset ``i % page_size``; its *slot* (the row of the flattened K/V
storage) is ``page * page_size + offset``. Memory is reserved page by page as a session grows,
never for a maximum length up front.

:class:`CacheManager` owns the tables of every session on one server and keeps the pool's
reference counts equal to the number of tables holding each page. Sharing happens through
:meth:`CacheManager.fork` (a new session starts from another one's prefix); a shared page is
copied before anyone writes into it (:meth:`CacheManager.prepare_write` returns the copies the
tensor layer must make).

The usual way to run an inference step is :meth:`CacheManager.begin_writes`: for several sessions
at once it rolls each back to its start position, reserves room for the new tokens and un-shares
the pages about to be written -- or, when the pool cannot hold it all, changes nothing and returns
``None``.

Errors: an unknown session raises :class:`KeyError`; a range that makes no sense (negative,
beyond the session's length, a session opened twice) raises :class:`ValueError`. Both are bugs of
the caller, who validates wire input first. Running out of pages is not an error: ``False`` or
``None`` is returned and nothing changes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from distllm.kvcache.pool import PagePool

__all__ = ["CacheManager", "PageCopy", "PageTable", "WriteRequest", "pages_for"]

SessionId = Hashable

PageCopy = tuple[int, int]
"""``(src_page, dst_page)``: copy every block's K/V of ``src_page`` into ``dst_page``."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // page_size)


@dataclass
class PageTable:
    """The pages of one session, in token order."""

    page_size: int
    # Invariant: len(pages) == pages_for(length, page_size) -- no page is reserved ahead.
    pages: list[int] = field(default_factory=list)
    # Number of tokens whose K/V are (or, during a step, are about to be) in the pages.
    length: int = 0

    @property
    def capacity(self) -> int:
        """Tokens the held pages can store."""
        return len(self.pages) * self.page_size

    def slot(self, position: int) -> int:
        """Row of the flattened K/V storage for the token at ``position``."""
        return self.pages[position // self.page_size] * self.page_size + position % self.page_size


@dataclass(frozen=True)
class WriteRequest:
    """One session's share of a step: tokens ``[start, end)`` are about to be written."""

    session_id: SessionId
    start: int
    end: int


class CacheManager:
    """Page tables of many sessions over one pool; keeps the pool's reference counts honest.

    Invariant: for every page p, ``pool.refcount(p)`` equals the number of tables whose ``pages``
    contain p (a table never holds the same page twice).
    """

    def __init__(self, pool: PagePool, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.pool = pool
        self.page_size = page_size
        self._tables: dict[SessionId, PageTable] = {}

    # -- queries -------------------------------------------------------------------------------

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def sessions(self) -> Iterator[SessionId]:
        """Ids of the open sessions."""
        return iter(self._tables)

    def table(self, session_id: SessionId) -> PageTable:
        """The live table of a session (read it, do not mutate it)."""
        return self._tables[session_id]

    def length(self, session_id: SessionId) -> int:
        """Tokens currently cached for the session."""
        return self._tables[session_id].length

    def pages(self, session_id: SessionId) -> tuple[int, ...]:
        """The session's pages in token order (what attention reads through)."""
        return tuple(self._tables[session_id].pages)

    def slots(self, session_id: SessionId, start: int, end: int) -> list[int]:
        """Storage rows of tokens ``[start, end)``; they must lie within the reserved pages."""
        table = self._tables[session_id]
        if not 0 <= start <= end <= table.capacity:
            raise ValueError(
                f"slots [{start}, {end}) outside the {table.capacity} reserved tokens of "
                f"session {session_id!r}"
            )
        return [table.slot(i) for i in range(start, end)]

    @property
    def free_tokens(self) -> int:
        """Tokens that can still be reserved by growing sessions (free pages x page size)."""
        return self.pool.num_free * self.page_size

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, session_id: SessionId) -> None:
        """Start an empty session; it holds no page until it reserves."""
        if session_id in self._tables:
            raise ValueError(f"session {session_id!r} is already open")
        self._tables[session_id] = PageTable(self.page_size)

    def close(self, session_id: SessionId) -> None:
        """Forget the session and release its pages (shared pages stay with their other owners)."""
        table = self._tables.pop(session_id)
        for page in table.pages:
            self.pool.decref(page)

    def fork(self, src: SessionId, dst: SessionId, length: int) -> None:
        """Open ``dst`` holding the first ``length`` tokens of ``src`` by sharing its pages.

        Needs no free page: the prefix is shared, and copied later only where either session
        writes into a shared page (:meth:`prepare_write`).
        """
        source = self._tables[src]
        if dst in self._tables:
            raise ValueError(f"session {dst!r} is already open")
        if not 0 <= length <= source.length:
            raise ValueError(f"cannot fork {length} tokens from a session of {source.length}")
        pages = source.pages[: pages_for(length, self.page_size)]
        for page in pages:
            self.pool.incref(page)
        self._tables[dst] = PageTable(self.page_size, list(pages), length)

    # -- growth and rollback -------------------------------------------------------------------

    def reserve(self, session_id: SessionId, new_length: int) -> bool:
        """Grow the session to ``new_length`` tokens, taking pages as needed.

        Returns ``False`` and changes nothing when the pool lacks the pages. Shrinking is
        :meth:`truncate`'s job.
        """
        table = self._tables[session_id]
        if new_length < table.length:
            raise ValueError(f"reserve cannot shrink {table.length} tokens to {new_length}")
        missing = pages_for(new_length, self.page_size) - len(table.pages)
        new_pages = self.pool.allocate(missing)
        if new_pages is None:
            return False
        table.pages.extend(new_pages)
        table.length = new_length
        return True

    def truncate(self, session_id: SessionId, length: int) -> None:
        """Roll the session back to its first ``length`` tokens, releasing the pages beyond."""
        table = self._tables[session_id]
        if not 0 <= length <= table.length:
            raise ValueError(f"cannot truncate a session of {table.length} tokens to {length}")
        keep = pages_for(length, self.page_size)
        for page in table.pages[keep:]:
            self.pool.decref(page)
        del table.pages[keep:]
        table.length = length

    def prepare_write(self, session_id: SessionId, start: int, end: int) -> list[PageCopy] | None:
        """Un-share the pages that tokens ``[start, end)`` will be written into.

        Every page in the range held by another session too is replaced, in this table only, by
        a fresh page; the returned ``(src, dst)`` pairs must be copied by the tensor layer before
        any write. ``None`` (nothing changed) when the pool lacks the pages.
        """
        table = self._tables[session_id]
        if not 0 <= start <= end <= table.capacity:
            raise ValueError(
                f"write [{start}, {end}) outside the {table.capacity} reserved tokens of "
                f"session {session_id!r}"
            )
        if start == end:
            return []
        first, last = start // self.page_size, (end - 1) // self.page_size
        shared = [i for i in range(first, last + 1) if self.pool.refcount(table.pages[i]) > 1]
        fresh = self.pool.allocate(len(shared))
        if fresh is None:
            return None
        copies: list[PageCopy] = []
        for index, dst in zip(shared, fresh, strict=True):
            src = table.pages[index]
            table.pages[index] = dst
            self.pool.decref(src)  # stays >= 1: another session still holds it
            copies.append((src, dst))
        return copies

    def begin_writes(self, requests: Sequence[WriteRequest]) -> list[PageCopy] | None:
        """Prepare one step for several sessions, all or nothing.

        For each request: roll back to ``start`` (``start`` may not exceed the current length),
        grow to ``end``, and un-share the pages of ``[start, end)``. Returns the page copies to
        make before writing, or ``None`` -- with every table untouched -- when the pool cannot
        hold the step.

        The room check is exact for independent sessions and errs on the safe side when
        sessions of the same step share pages with each other.
        """
        seen: set[SessionId] = set()
        need = 0
        freed = 0
        for request in requests:
            table = self._tables[request.session_id]
            if request.session_id in seen:
                raise ValueError(f"session {request.session_id!r} appears twice in one step")
            seen.add(request.session_id)
            if not 0 <= request.start <= request.end or request.start > table.length:
                raise ValueError(
                    f"cannot write [{request.start}, {request.end}) to session "
                    f"{request.session_id!r} of {table.length} tokens"
                )
            kept = pages_for(request.start, self.page_size)
            # Pages that only this session holds return to the pool when it rolls back.
            freed += sum(1 for p in table.pages[kept:] if self.pool.refcount(p) == 1)
            need += pages_for(request.end, self.page_size) - kept
            partial = request.start % self.page_size != 0 and request.end > request.start
            if partial and self.pool.refcount(table.pages[request.start // self.page_size]) > 1:
                need += 1  # the partly filled page we will write into is shared: copy it
        if need > self.pool.num_free + freed:
            return None
        # Every rollback first, so the pages it frees are there for every session's growth.
        for request in requests:
            if request.start < self.length(request.session_id):
                self.truncate(request.session_id, request.start)
        copies: list[PageCopy] = []
        for request in requests:
            grown = self.reserve(request.session_id, request.end)
            made = self.prepare_write(request.session_id, request.start, request.end)
            if not grown or made is None:  # pragma: no cover - excluded by the room check above
                raise AssertionError("page accounting of begin_writes is wrong")
            copies.extend(made)
        return copies
