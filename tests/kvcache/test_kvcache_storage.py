"""Torch page storage: slot arithmetic, scatter/gather round trips, page copies."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.kvcache import CacheManager, PagePool
from distllm.kvcache.storage import PagedKVStorage, slot_index


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.integers(1, 5),
    length=st.integers(0, 20),
    data=st.data(),
)
def test_slot_index_matches_the_table(page_size: int, length: int, data: st.DataObject) -> None:
    manager = CacheManager(PagePool(45), page_size)
    manager.open("s")
    manager.open("noise")
    for size in (1, length):  # interleave another session so pages are not contiguous
        assert manager.reserve("noise", manager.length("noise") + size)
        assert manager.reserve("s", max(manager.length("s"), size))
    start = data.draw(st.integers(0, length))
    end = data.draw(st.integers(start, length))
    got = slot_index(manager.pages("s"), page_size, start, end).tolist()
    assert got == manager.slots("s", start, end)


def test_write_gather_and_copy_pages() -> None:
    storage = PagedKVStorage(2, num_pages=3, page_size=2, num_kv_heads=2, head_dim=4)
    assert storage.bytes_per_page == 2 * 2 * 2 * 2 * 4 * 4
    key = torch.randn(3, 2, 4)
    value = torch.randn(3, 2, 4)
    slots = torch.tensor([5, 0, 1])
    storage.write(1, slots, key, value)
    got_key, got_value = storage.gather(1, slots)
    assert torch.equal(got_key, key) and torch.equal(got_value, value)
    assert storage.keys[0].abs().sum() == 0  # other blocks untouched
    storage.copy_pages([(0, 2)])  # page 0 = slots 0, 1 -> page 2 = slots 4, 5
    copied, _ = storage.gather(1, torch.tensor([[4, 5]]))
    assert torch.equal(copied[0], key[1:])
