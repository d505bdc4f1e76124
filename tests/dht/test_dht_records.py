"""RecordStore and signed entries: ownership, signatures, expiry, bounds and eviction."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.dht.records import (
    RecordLimits,
    RecordRejected,
    RecordStore,
    RejectReason,
    SignedEntry,
    entry_from_wire,
    entry_to_wire,
    parse_peer_subkey,
    peer_subkey,
    sign_entry,
    signing_payload,
    verify_entry,
)
from distllm.errors import RemoteProtocolError
from distllm.identity import Identity

ALICE, BOB, CAROL, DAVE = (Identity.from_seed(bytes([i + 1]) * 32) for i in range(4))
PEOPLE = (ALICE, BOB, CAROL, DAVE)
NOW = 1_700_000_000.0


def rejected(reason: RejectReason) -> pytest.RaisesExc[RecordRejected]:
    return pytest.raises(RecordRejected, match=f"\\({reason.value}\\)")


def test_valid_entry_is_stored_and_read_back() -> None:
    store = RecordStore()
    entry = sign_entry(ALICE, "m/0", b"hello", NOW + 60)
    assert entry.subkey == peer_subkey(ALICE.peer_id)
    assert store.store(entry, NOW) is True
    assert store.get("m/0", NOW) == {entry.subkey: entry}
    assert store.get_entry("m/0", entry.subkey, NOW) == entry
    assert store.get("other", NOW) == {} and len(store) == 1
    assert list(store.items(NOW)) == [entry] and store.keys() == ["m/0"]
    verify_entry(entry)  # readers use the same check


def test_peer_subkey_round_trip_and_one_spelling() -> None:
    subkey = peer_subkey(BOB.peer_id)
    assert parse_peer_subkey(subkey) == BOB.peer_id
    for bad in ("", "peer:", subkey.upper(), "peer:" + subkey[5:].upper(), "node:" + subkey[5:]):
        assert parse_peer_subkey(bad) is None


def test_rejections_are_remote_protocol_errors_with_a_reason() -> None:
    exc = RecordRejected(RejectReason.TOO_FAR, "x")
    assert isinstance(exc, RemoteProtocolError) and exc.reason is RejectReason.TOO_FAR


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"value": b"tampered"}, RejectReason.BAD_SIGNATURE),
        ({"expiration": NOW + 61}, RejectReason.BAD_SIGNATURE),
        ({"key": "m/1"}, RejectReason.BAD_SIGNATURE),
        ({"signature": bytes(64)}, RejectReason.BAD_SIGNATURE),
        ({"signature": b"short"}, RejectReason.BAD_SIGNATURE),
        # Bob's key with Alice's subkey and signature: the key does not own the subkey.
        ({"signer_public_key": BOB.public_key_bytes}, RejectReason.BAD_SUBKEY),
        ({"signer_public_key": b"\x00" * 31}, RejectReason.BAD_SUBKEY),
        ({"subkey": "free-for-all"}, RejectReason.BAD_SUBKEY),
        ({"expiration": math.nan}, RejectReason.MALFORMED),
        ({"expiration": 5}, RejectReason.MALFORMED),
        ({"value": "text"}, RejectReason.MALFORMED),
        ({"key": ""}, RejectReason.MALFORMED),
    ],
)
def test_tampered_entries_are_rejected(change: dict[str, object], reason: RejectReason) -> None:
    entry = dataclasses.replace(sign_entry(ALICE, "m/0", b"hello", NOW + 60), **change)  # type: ignore[arg-type]
    store = RecordStore()
    with rejected(reason):
        store.store(entry, NOW)
    with rejected(reason):
        verify_entry(entry)
    assert len(store) == 0


def test_nobody_can_write_another_peers_subkey() -> None:
    # Mallory (Bob) signs a value for Alice's subkey with his own key: valid signature,
    # wrong owner.
    alice_subkey = peer_subkey(ALICE.peer_id)
    payload = signing_payload("m/0", alice_subkey, b"evil", NOW + 60)
    forged = SignedEntry(
        "m/0", alice_subkey, b"evil", NOW + 60, BOB.public_key_bytes, BOB.sign(payload)
    )
    store = RecordStore()
    store.store(sign_entry(ALICE, "m/0", b"good", NOW + 30), NOW)
    with rejected(RejectReason.BAD_SUBKEY):
        store.store(forged, NOW)
    assert store.get("m/0", NOW)[alice_subkey].value == b"good"


def test_newer_expiration_wins_equal_keeps_existing() -> None:
    store = RecordStore()
    first = sign_entry(ALICE, "k", b"v1", NOW + 30)
    assert store.store(first, NOW)
    assert store.store(sign_entry(ALICE, "k", b"v0", NOW + 20), NOW) is False  # older
    assert store.store(sign_entry(ALICE, "k", b"v2", NOW + 30), NOW) is False  # equal
    assert store.get_entry("k", first.subkey, NOW) == first
    newer = sign_entry(ALICE, "k", b"v3", NOW + 40)
    assert store.store(newer, NOW)
    assert store.get("k", NOW) == {first.subkey: newer}
    assert len(store) == 1 and store.total_bytes == newer.size


def test_expired_entries_vanish() -> None:
    store = RecordStore()
    short = sign_entry(ALICE, "k", b"a", NOW + 10)
    long = sign_entry(BOB, "k", b"b", NOW + 100)
    assert store.store(short, NOW) and store.store(long, NOW)
    assert set(store.get("k", NOW + 9.9)) == {short.subkey, long.subkey}
    assert store.get("k", NOW + 10) == {long.subkey: long}  # expiration is exclusive
    assert store.get_entry("k", short.subkey, NOW + 10) is None
    assert list(store.items(NOW + 10)) == [long]
    assert store.purge(NOW + 10) == 1 and len(store) == 1
    assert store.purge(NOW + 100) == 1 and len(store) == 0 and store.keys() == []
    assert store.total_bytes == 0
    # Already expired on arrival: valid, but not kept.
    assert store.store(sign_entry(ALICE, "k", b"a", NOW), NOW) is False


def test_expired_entry_is_replaced_by_a_newer_one() -> None:
    store = RecordStore()
    store.store(sign_entry(ALICE, "k", b"old", NOW + 10), NOW)
    fresh = sign_entry(ALICE, "k", b"new", NOW + 50)
    assert store.store(fresh, NOW + 20)
    assert store.get("k", NOW + 20) == {fresh.subkey: fresh} and len(store) == 1


def test_far_future_and_oversized_entries_are_rejected() -> None:
    store = RecordStore(RecordLimits(max_ttl=100.0, max_value_bytes=8, max_key_bytes=4))
    assert store.store(sign_entry(ALICE, "k", b"x", NOW + 100), NOW)
    with rejected(RejectReason.TOO_FAR):
        store.store(sign_entry(BOB, "k", b"x", NOW + 100.5), NOW)
    with rejected(RejectReason.TOO_LARGE):
        store.store(sign_entry(BOB, "k", b"123456789", NOW + 10), NOW)
    with rejected(RejectReason.TOO_LARGE):
        store.store(sign_entry(BOB, "kkkkk", b"x", NOW + 10), NOW)


def test_subkeys_per_key_evict_soonest_expiring() -> None:
    store = RecordStore(RecordLimits(max_subkeys_per_key=2))
    a = sign_entry(ALICE, "k", b"a", NOW + 30)
    b = sign_entry(BOB, "k", b"b", NOW + 20)
    assert store.store(a, NOW) and store.store(b, NOW)
    assert store.store(sign_entry(CAROL, "k", b"c", NOW + 10), NOW) is False  # soonest: itself
    assert store.store(sign_entry(CAROL, "k", b"c", NOW + 20), NOW) is False  # tie: keep old
    c = sign_entry(CAROL, "k", b"c", NOW + 25)
    assert store.store(c, NOW)
    assert set(store.get("k", NOW)) == {a.subkey, c.subkey}
    assert store.store(sign_entry(DAVE, "other", b"d", NOW + 1), NOW)  # other keys unaffected
    assert len(store) == 3


def test_global_bounds_evict_soonest_expiring() -> None:
    entry_size = sign_entry(ALICE, "k0", b"v", NOW + 1).size
    store = RecordStore(RecordLimits(max_entries=3, max_total_bytes=10 * entry_size))
    for i, who in enumerate(PEOPLE):
        store.store(sign_entry(who, f"k{i}", b"v", NOW + 10 * (i + 1)), NOW)
    assert len(store) == 3 and store.keys() == ["k1", "k2", "k3"]
    assert store.store(sign_entry(ALICE, "k9", b"v", NOW + 5), NOW) is False

    by_bytes = RecordStore(RecordLimits(max_total_bytes=2 * entry_size + 10))
    assert by_bytes.store(sign_entry(ALICE, "k1", b"v", NOW + 30), NOW)
    assert by_bytes.store(sign_entry(BOB, "k2", b"v", NOW + 20), NOW)
    bigger = sign_entry(CAROL, "k3", b"v" * 11, NOW + 40)  # fits after evicting one
    assert by_bytes.store(bigger, NOW)
    assert by_bytes.keys() == ["k1", "k3"]  # k2 expired soonest
    too_big = sign_entry(DAVE, "k4", b"v" * (entry_size + 20), NOW + 50)  # over the budget
    assert by_bytes.store(too_big, NOW) is False
    assert by_bytes.keys() == ["k1", "k3"]  # nothing evicted for it
    biggest = sign_entry(DAVE, "k4", b"v" * (entry_size + 5), NOW + 50)  # room for it alone
    assert by_bytes.store(biggest, NOW)
    assert by_bytes.keys() == ["k4"] and by_bytes.total_bytes == biggest.size


def test_no_partial_eviction_when_the_new_entry_loses() -> None:
    size = sign_entry(ALICE, "k0", b"v", NOW + 1).size
    store = RecordStore(RecordLimits(max_total_bytes=2 * size + 10))
    store.store(sign_entry(ALICE, "k1", b"v", NOW + 20), NOW)
    store.store(sign_entry(BOB, "k2", b"v", NOW + 30), NOW)
    # Needs both slots, but k2 expires after it: neither k1 nor k2 may go.
    assert store.store(sign_entry(CAROL, "k3", b"v" * (size + 5), NOW + 25), NOW) is False
    assert store.keys() == ["k1", "k2"] and len(store) == 2


def test_wire_form_round_trip_and_strictness() -> None:
    entry = sign_entry(ALICE, "m/0", b"v", NOW + 60)
    assert entry_from_wire(entry_to_wire(entry)) == entry
    assert entry_from_wire(tuple(entry_to_wire(entry))) == entry
    for bad in (None, [], entry_to_wire(entry)[:5], [*entry_to_wire(entry)[:3], 5, b"", b""]):
        with pytest.raises(RemoteProtocolError):
            entry_from_wire(bad)


def test_sign_entry_misuse() -> None:
    with pytest.raises(ValueError, match="key must be a non-empty str"):
        sign_entry(ALICE, "", b"v", NOW)
    with pytest.raises(ValueError, match="expiration must be finite"):
        sign_entry(ALICE, "k", b"v", math.inf)
    with pytest.raises(TypeError, match="value must be bytes"):
        sign_entry(ALICE, "k", "v", NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_ttl must be finite and > 0"):
        RecordLimits(max_ttl=0)


# -- model-based -----------------------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.integers(0, 3),  # who
        st.sampled_from(["a", "b", "c"]),  # key
        st.binary(max_size=40),  # value
        st.integers(-5, 30),  # expiration - now
        st.integers(0, 5),  # time advance before the operation
    ),
    max_size=40,
)


@given(ops=operations)
@settings(max_examples=60, deadline=None)
def test_store_matches_a_model_when_unbounded(ops: list[tuple[int, str, bytes, int, int]]) -> None:
    store = RecordStore()
    model: dict[tuple[str, str], SignedEntry] = {}
    now = NOW
    for who, key, value, ttl, advance in ops:
        now += advance
        entry = sign_entry(PEOPLE[who], key, value, now + ttl)
        old = model.get((key, entry.subkey))
        expected = ttl > 0 and (old is None or old.expiration <= now or old.expiration < now + ttl)
        assert store.store(entry, now) is expected
        if expected:
            model[(key, entry.subkey)] = entry
        for k in ("a", "b", "c"):
            live = {sub: e for (kk, sub), e in model.items() if kk == k and e.expiration > now}
            assert store.get(k, now) == live


@given(ops=operations, max_entries=st.integers(1, 5), max_subkeys=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_bounds_hold_and_survivors_expire_latest(
    ops: list[tuple[int, str, bytes, int, int]], max_entries: int, max_subkeys: int
) -> None:
    limits = RecordLimits(
        max_entries=max_entries, max_subkeys_per_key=max_subkeys, max_total_bytes=700
    )
    store = RecordStore(limits)
    now = NOW
    for who, key, value, ttl, advance in ops:
        now += advance
        entry = sign_entry(PEOPLE[who], key, value, now + ttl)
        store.purge(now)
        before = set(everything_in(store))
        kept = store.store(entry, now)
        after = everything_in(store)
        if not kept:
            assert set(after) == before
        assert len(store) == len(after) <= max_entries
        assert store.total_bytes == sum(e.size for e in after) <= 700
        names = store.keys()
        assert all(0 < len(store.get(k, -math.inf)) <= max_subkeys for k in names)
        if kept:
            assert store.get_entry(key, entry.subkey, now) == entry
        # Whatever was evicted (not replaced, not expired) expired no later than any survivor.
        replaced = {(e.key, e.subkey) for e in after}
        evicted = [e for e in before if e.expiration > now and (e.key, e.subkey) not in replaced]
        if not kept and ttl > 0 and entry.size <= 700:
            stale = any(
                (e.key, e.subkey) == (key, entry.subkey) and e.expiration >= entry.expiration
                for e in before
            )
            if not stale:
                evicted.append(entry)
        for gone in evicted:  # by the global bounds, or by its key's subkey bound
            same_key = [e.expiration for e in after if e.key == gone.key]
            assert gone.expiration <= min((e.expiration for e in after), default=math.inf) or (
                len(same_key) == max_subkeys and gone.expiration <= min(same_key)
            )


def everything_in(store: RecordStore) -> list[SignedEntry]:
    names = store.keys()
    return [e for k in names for e in store.get(k, -math.inf).values()]
