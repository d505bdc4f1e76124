"""The page pool and the page tables, driven by a Hypothesis state machine.

Besides the bookkeeping invariants (free + referenced = capacity, reference counts equal the
number of tables holding a page, no page both free and used, no over-commit, failures change
nothing) the machine keeps a fake K/V storage -- one int per slot -- and a shadow copy of every
session's tokens, so copy-on-write is checked end to end: no session ever reads another's writes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from distllm.kvcache import CacheManager, PagePool, WriteRequest, pages_for

PAGE_SIZE = 4
NUM_PAGES = 10
SESSIONS = st.sampled_from(range(5))


def test_pool_allocates_all_or_nothing() -> None:
    pool = PagePool(3)
    assert pool.allocate(4) is None
    assert pool.num_free == 3
    pages = pool.allocate(3)
    assert pages is not None and sorted(pages) == [0, 1, 2]
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []


def test_pool_refcounts_return_pages_at_zero() -> None:
    pool = PagePool(2)
    (page,) = pool.allocate(1) or []
    pool.incref(page)
    pool.decref(page)
    assert pool.num_free == 1 and pool.refcount(page) == 1
    pool.decref(page)
    assert pool.num_free == 2 and pool.refcount(page) == 0


def test_pool_rejects_misuse() -> None:
    pool = PagePool(2)
    with pytest.raises(ValueError, match="free"):
        pool.decref(0)
    with pytest.raises(ValueError, match="free"):
        pool.incref(1)
    with pytest.raises(ValueError, match="outside"):
        pool.refcount(2)
    with pytest.raises(ValueError):
        PagePool(-1)


def test_pool_reuses_the_last_freed_page_first() -> None:
    pool = PagePool(4)
    pages = pool.allocate(4) or []
    pool.decref(pages[2])
    assert pool.allocate(1) == [pages[2]]


def test_table_slots_and_growth() -> None:
    manager = CacheManager(PagePool(4), page_size=4)
    manager.open("a")
    assert manager.reserve("a", 6)
    pages = manager.pages("a")
    assert len(pages) == 2
    assert manager.slots("a", 3, 6) == [pages[0] * 4 + 3, pages[1] * 4, pages[1] * 4 + 1]
    assert manager.free_tokens == 8
    assert not manager.reserve("a", 17)  # would need 5 pages: refused, nothing changed
    assert manager.length("a") == 6 and manager.pages("a") == pages
    with pytest.raises(ValueError, match="shrink"):
        manager.reserve("a", 2)
    with pytest.raises(ValueError, match="outside"):
        manager.slots("a", 0, 9)
    with pytest.raises(KeyError):
        manager.length("nope")
    with pytest.raises(ValueError, match="already open"):
        manager.open("a")


def test_fork_then_write_copies_the_shared_partial_page() -> None:
    manager = CacheManager(PagePool(6), page_size=4)
    manager.open("a")
    assert manager.reserve("a", 6)
    manager.fork("a", "b", 6)
    a_pages = manager.pages("a")
    assert manager.pages("b") == a_pages
    copies = manager.begin_writes([WriteRequest("b", 6, 7)])
    assert copies == [(a_pages[1], manager.pages("b")[1])]
    assert manager.pages("b")[0] == a_pages[0]  # the full page stays shared
    assert manager.pool.refcount(a_pages[0]) == 2 and manager.pool.refcount(a_pages[1]) == 1


def test_begin_writes_counts_pages_freed_by_rollback() -> None:
    manager = CacheManager(PagePool(2), page_size=4)
    manager.open("a")
    assert manager.reserve("a", 8)
    assert manager.pool.num_free == 0
    # Rolling back to 4 frees a page that the rewrite of [4, 8) can take again.
    assert manager.begin_writes([WriteRequest("a", 4, 8)]) == []
    assert manager.begin_writes([WriteRequest("a", 4, 9)]) is None
    assert manager.length("a") == 8
    with pytest.raises(ValueError, match="twice"):
        manager.begin_writes([WriteRequest("a", 8, 9), WriteRequest("a", 8, 9)])
    with pytest.raises(ValueError, match="cannot write"):
        manager.begin_writes([WriteRequest("a", 9, 10)])


class PagedCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(NUM_PAGES)
        self.manager = CacheManager(self.pool, PAGE_SIZE)
        self.storage: list[Any] = [None] * (NUM_PAGES * PAGE_SIZE)  # fake K/V, one value a slot
        self.shadow: dict[int, list[Any]] = {}  # what each session should read back
        self.counter = 0

    # -- helpers -------------------------------------------------------------------------------

    def snapshot(self) -> tuple[Any, ...]:
        tables = {s: (self.manager.pages(s), self.manager.length(s)) for s in self.shadow}
        counts = tuple(self.pool.refcount(p) for p in range(NUM_PAGES))
        return tables, counts, self.pool.num_free

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            assert self.pool.refcount(dst) == 1
            assert self.pool.refcount(src) >= 1  # someone still reads the source
            lo_src, lo_dst = src * PAGE_SIZE, dst * PAGE_SIZE
            self.storage[lo_dst : lo_dst + PAGE_SIZE] = self.storage[lo_src : lo_src + PAGE_SIZE]

    def fresh_values(self, n: int) -> list[int]:
        values = list(range(self.counter, self.counter + n))
        self.counter += n
        return values

    # -- rules ---------------------------------------------------------------------------------

    @rule(sid=SESSIONS)
    def open(self, sid: int) -> None:
        if sid in self.shadow:
            with pytest.raises(ValueError):
                self.manager.open(sid)
            return
        self.manager.open(sid)
        self.shadow[sid] = []

    @rule(sid=SESSIONS)
    def close(self, sid: int) -> None:
        if sid not in self.shadow:
            with pytest.raises(KeyError):
                self.manager.close(sid)
            return
        self.manager.close(sid)
        del self.shadow[sid]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), extra=st.integers(0, 3 * PAGE_SIZE))
    def reserve(self, data: st.DataObject, extra: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.shadow)))
        length = self.manager.length(sid)
        needed = pages_for(length + extra, PAGE_SIZE) - len(self.manager.pages(sid))
        before = self.snapshot()
        ok = self.manager.reserve(sid, length + extra)
        assert ok == (needed <= before[2])  # refuses exactly when the pool is short
        if ok:
            self.shadow[sid].extend([None] * extra)  # reserved, not written: unknown content
        else:
            assert self.snapshot() == before

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.shadow)))
        length = data.draw(st.integers(0, self.manager.length(sid)))
        self.manager.truncate(sid, length)
        del self.shadow[sid][length:]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), dst=SESSIONS)
    def fork(self, data: st.DataObject, dst: int) -> None:
        src = data.draw(st.sampled_from(sorted(self.shadow)))
        length = data.draw(st.integers(0, self.manager.length(src)))
        if dst in self.shadow:
            with pytest.raises(ValueError):
                self.manager.fork(src, dst, length)
            return
        free = self.pool.num_free
        self.manager.fork(src, dst, length)
        assert self.pool.num_free == free  # sharing takes no page
        self.shadow[dst] = self.shadow[src][:length]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def prepare_write_and_write(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.shadow)))
        length = self.manager.length(sid)
        start = data.draw(st.integers(0, length))
        end = data.draw(st.integers(start, length))
        before = self.snapshot()
        copies = self.manager.prepare_write(sid, start, end)
        if copies is None:
            assert self.snapshot() == before
            return
        self.apply_copies(copies)
        values = self.fresh_values(end - start)
        for slot, value in zip(self.manager.slots(sid, start, end), values, strict=True):
            self.storage[slot] = value
        self.shadow[sid][start:end] = values

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        sids = data.draw(st.lists(st.sampled_from(sorted(self.shadow)), min_size=1, unique=True))
        requests = []
        for sid in sids:
            start = data.draw(st.integers(0, self.manager.length(sid)))
            end = start + data.draw(st.integers(0, 2 * PAGE_SIZE))
            requests.append(WriteRequest(sid, start, end))
        before = self.snapshot()
        copies = self.manager.begin_writes(requests)
        if copies is None:
            assert self.snapshot() == before
            return
        self.apply_copies(copies)
        for request in requests:
            sid = request.session_id
            assert isinstance(sid, int)
            values = self.fresh_values(request.end - request.start)
            slots = self.manager.slots(sid, request.start, request.end)
            for slot in slots:
                assert self.pool.refcount(slot // PAGE_SIZE) == 1  # never write a shared page
            for slot, value in zip(slots, values, strict=True):
                self.storage[slot] = value
            self.shadow[sid] = self.shadow[sid][: request.start] + values
            assert self.manager.length(sid) == request.end

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def refcounts_match_tables(self) -> None:
        holders: Counter[int] = Counter()
        for sid in self.shadow:
            pages = self.manager.pages(sid)
            assert len(set(pages)) == len(pages)
            assert len(pages) == pages_for(self.manager.length(sid), PAGE_SIZE)
            holders.update(pages)
        for page in range(NUM_PAGES):
            assert self.pool.refcount(page) == holders[page]

    @invariant()
    def free_plus_used_is_capacity(self) -> None:
        free = self.pool._free
        assert len(set(free)) == len(free)
        used = {p for p in range(NUM_PAGES) if self.pool.refcount(p) > 0}
        assert not used & set(free)  # never a page both free and used
        assert len(free) + len(used) == self.pool.capacity == NUM_PAGES
        assert self.manager.free_tokens == len(free) * PAGE_SIZE

    @invariant()
    def sessions_read_their_own_tokens(self) -> None:
        for sid, expected in self.shadow.items():
            slots = self.manager.slots(sid, 0, self.manager.length(sid))
            got = [self.storage[s] for s in slots]
            for position, (want, have) in enumerate(zip(expected, got, strict=True)):
                if want is not None:
                    assert have == want, f"session {sid} position {position}"


PagedCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_paged_cache_machine = PagedCacheMachine.TestCase
