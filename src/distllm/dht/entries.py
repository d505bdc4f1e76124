"""Checks and merges of signed entries on the way into and out of a DHT node (pure).

What a writer must refuse before sending (every storer would reject it), what a reader accepts
from a peer's reply, how copies from several holders merge, and how a batch of entries is cut
into ``dht.store`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from distllm.dht.messages import entries_from_wire
from distllm.dht.records import RecordLimits, RecordRejected, SignedEntry, verify_entry
from distllm.errors import RemoteProtocolError

__all__ = ["Entries", "accept_entries", "check_key", "check_own", "merge", "store_batches"]

Entries = dict[str, SignedEntry]  # subkey -> entry


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty str, got {key!r}")
    return key


def check_own(entry: SignedEntry, limits: RecordLimits, now: float) -> None:
    """``ValueError`` for an entry no storer would accept (checked before any traffic)."""
    try:
        verify_entry(entry)
    except RecordRejected as exc:
        raise ValueError(f"cannot store this entry: {exc}") from None
    if len(entry.key.encode("utf-8")) > limits.max_key_bytes:
        raise ValueError(f"key longer than {limits.max_key_bytes} bytes")
    if len(entry.value) > limits.max_value_bytes:
        raise ValueError(f"value of {len(entry.value)} bytes > {limits.max_value_bytes}")
    if entry.expiration > now + limits.max_ttl:
        raise ValueError(f"expiration more than max_ttl={limits.max_ttl:g} s from now")


def accept_entries(key: str, items: Sequence[object], limits: RecordLimits, now: float) -> Entries:
    """The entries a peer returned for ``key``, newest per subkey.

    Every item must be well-formed, under ``key`` and validly signed, and there may be at most
    ``max_subkeys_per_key`` of them: else ``RemoteProtocolError`` (an honest holder checked all
    that when it stored them, so the peer is at fault). Entries expired at ``now``, or expiring
    beyond ``max_ttl`` (clock skew), are dropped without blame.
    """
    if len(items) > limits.max_subkeys_per_key:
        raise RemoteProtocolError(f"{len(items)} entries for one key")
    found: Entries = {}
    for entry in entries_from_wire(items):
        if entry.key != key:
            raise RemoteProtocolError(f"asked for {key!r}, got an entry of {entry.key!r}")
        verify_entry(entry)
        if now < entry.expiration <= now + limits.max_ttl:
            merge(found, [entry])
    return found


def merge(into: Entries, entries: Iterable[SignedEntry]) -> None:
    """Keep the entry with the latest expiration per subkey (its owner's newest word)."""
    for entry in entries:
        current = into.get(entry.subkey)
        if current is None or entry.expiration > current.expiration:
            into[entry.subkey] = entry


def store_batches(
    entries: Sequence[SignedEntry], max_entries: int, budget: int
) -> Iterator[tuple[int, Sequence[SignedEntry]]]:
    """Consecutive ``(start, batch)`` slices of at most ``max_entries`` entries and about
    ``budget`` bytes (an entry larger than the budget travels alone)."""
    start = 0
    while start < len(entries):
        end, size = start, 0
        while end < len(entries) and end - start < max_entries:
            size += entries[end].size
            if size > budget and end > start:
                break
            end += 1
        yield start, entries[start:end]
        start = end
