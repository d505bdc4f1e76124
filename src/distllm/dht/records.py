"""Signed, expiring DHT records and the bounded store that keeps them (pure, no clock).

A record lives under a *key* (text) and a *subkey*. Every subkey names its owner:
``"peer:<peer-id>"`` (:func:`peer_subkey`), and an entry under it is accepted only with a valid
Ed25519 signature by the key that hashes to that peer id. Unsigned subkeys do not exist: anyone
could overwrite them, and distllm's own records are all signed. So nobody can overwrite or
delete another peer's announcement; one peer has one entry per key.

The signature covers ``signing_payload(key, subkey, value, expiration)``::

    b"distllm-dht-record-v1\\0" || u32be len || key (UTF-8) || u32be len || subkey (UTF-8)
                                || u32be len || value || f64be expiration

Expirations are absolute **wall-clock** times (POSIX seconds): they travel between machines, so
the ``now`` given to this module must be ``time.time()``-like, not a monotonic clock. Peers'
clock skew is absorbed by ``max_ttl``.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from distllm.errors import RemoteProtocolError
from distllm.identity import Identity, verify_signature
from distllm.ids import PeerID

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "RecordLimits",
    "RecordRejected",
    "RecordStore",
    "RejectReason",
    "SignedEntry",
    "entry_from_wire",
    "entry_to_wire",
    "parse_peer_subkey",
    "peer_subkey",
    "sign_entry",
    "signing_payload",
    "verify_entry",
]

_SIGNING_DOMAIN = b"distllm-dht-record-v1\x00"
_SUBKEY_PREFIX = "peer:"
#: Bytes charged per entry besides key, subkey and value: public key, signature, expiration.
ENTRY_OVERHEAD_BYTES = 32 + 64 + 8


class RejectReason(enum.StrEnum):
    BAD_SUBKEY = "bad-subkey"  # not "peer:<peer-id>", or the signer's key is not that peer's
    BAD_SIGNATURE = "bad-signature"
    MALFORMED = "malformed"  # wrong types, non-finite expiration, empty key
    TOO_LARGE = "too-large"  # key or value over the limits
    TOO_FAR = "too-far"  # expires later than now + max_ttl


class RecordRejected(RemoteProtocolError):
    """An entry broke a storage rule: the peer that sent it is at fault.

    A :class:`~distllm.errors.RemoteProtocolError`, so generic handlers treat the sender as
    misbehaving; the DHT handler can catch it by type and answer with ``reason`` instead of
    dropping the connection. Entries that are valid but not kept (stale, already expired,
    evicted at once) are not errors: :meth:`RecordStore.store` returns ``False``.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"record rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


def peer_subkey(peer: PeerID) -> str:
    """The subkey owned by ``peer``: ``"peer:<peer-id>"``."""
    return f"{_SUBKEY_PREFIX}{peer}"


def parse_peer_subkey(subkey: str) -> PeerID | None:
    """The owner named by a subkey, or ``None`` if it is not a well-formed peer subkey."""
    if not subkey.startswith(_SUBKEY_PREFIX):
        return None
    text = subkey[len(_SUBKEY_PREFIX) :]
    try:
        peer = PeerID.from_string(text)
    except ValueError:
        return None
    return peer if str(peer) == text else None  # one spelling only (no upper case)


def signing_payload(key: str, subkey: str, value: bytes, expiration: float) -> bytes:
    """The canonical bytes an entry's signature covers (see the module docstring)."""
    parts = [_SIGNING_DOMAIN]
    for field in (key.encode("utf-8"), subkey.encode("utf-8"), value):
        parts += (struct.pack(">I", len(field)), field)
    parts.append(struct.pack(">d", expiration))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class SignedEntry:
    """One value under (key, subkey), signed by the subkey's owner."""

    key: str
    subkey: str
    value: bytes
    expiration: float  # absolute wall-clock time, POSIX seconds
    signer_public_key: bytes  # raw Ed25519, 32 bytes
    signature: bytes  # 64 bytes, over signing_payload(key, subkey, value, expiration)

    @property
    def size(self) -> int:
        """Bytes charged against the store's budget."""
        return (
            len(self.key.encode("utf-8"))
            + len(self.subkey.encode("utf-8"))
            + len(self.value)
            + ENTRY_OVERHEAD_BYTES
        )


def entry_to_wire(entry: SignedEntry) -> list[object]:
    """The CBOR-ready form of an entry: ``[key, subkey, value, expiration, public_key, sig]``."""
    return [
        entry.key,
        entry.subkey,
        entry.value,
        entry.expiration,
        entry.signer_public_key,
        entry.signature,
    ]


def entry_from_wire(obj: object) -> SignedEntry:
    """Parse :func:`entry_to_wire`'s form as decoded from a peer's message.

    Raises :class:`~distllm.errors.RemoteProtocolError` on a wrong shape or types; the
    signature is not checked here (see :func:`verify_entry`).
    """
    if not isinstance(obj, list | tuple) or len(obj) != 6:
        raise RemoteProtocolError("a DHT entry is a 6-item array")
    key, subkey, value, expiration, public_key, signature = obj
    if not (
        isinstance(key, str)
        and isinstance(subkey, str)
        and isinstance(value, bytes)
        and isinstance(expiration, float)
        and isinstance(public_key, bytes)
        and isinstance(signature, bytes)
    ):
        raise RemoteProtocolError("a DHT entry is [text, text, bytes, float, bytes, bytes]")
    return SignedEntry(key, subkey, value, expiration, public_key, signature)


def sign_entry(identity: Identity, key: str, value: bytes, expiration: float) -> SignedEntry:
    """Sign ``value`` under ``key`` and the identity's own subkey."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty str, got {key!r}")
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    if not math.isfinite(expiration):
        raise ValueError(f"expiration must be finite, got {expiration!r}")
    subkey = peer_subkey(identity.peer_id)
    expiration = float(expiration)
    signature = identity.sign(signing_payload(key, subkey, value, expiration))
    return SignedEntry(key, subkey, value, expiration, identity.public_key_bytes, signature)


def verify_entry(entry: SignedEntry) -> None:
    """Raise :class:`RecordRejected` unless ``entry`` is well-formed and signed by the owner of
    its subkey. Readers call it on every entry a peer hands them; the store calls it too."""
    if not (
        isinstance(entry.key, str)
        and entry.key
        and isinstance(entry.subkey, str)
        and isinstance(entry.value, bytes)
        and isinstance(entry.expiration, float)
        and math.isfinite(entry.expiration)
        and isinstance(entry.signer_public_key, bytes)
        and isinstance(entry.signature, bytes)
    ):
        raise RecordRejected(RejectReason.MALFORMED, "wrong field types or values")
    owner = parse_peer_subkey(entry.subkey)
    if owner is None:
        raise RecordRejected(RejectReason.BAD_SUBKEY, f"not a peer subkey: {entry.subkey!r}")
    if (
        len(entry.signer_public_key) != 32
        or PeerID.from_public_key(entry.signer_public_key) != owner
    ):
        raise RecordRejected(RejectReason.BAD_SUBKEY, f"signer does not own {entry.subkey!r}")
    payload = signing_payload(entry.key, entry.subkey, entry.value, entry.expiration)
    if not verify_signature(entry.signer_public_key, entry.signature, payload):
        raise RecordRejected(RejectReason.BAD_SIGNATURE, f"under {entry.key!r}")


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """Bounds of a :class:`RecordStore`; invalid values raise ``ValueError``."""

    max_key_bytes: int = 512
    max_value_bytes: int = 16 * 1024
    #: Servers announcing one block each own a subkey of that block's key.
    max_subkeys_per_key: int = 1024
    max_entries: int = 100_000
    max_total_bytes: int = 64 * 1024 * 1024
    #: Seconds from now an expiration may lie at most (announcements are refreshed far sooner).
    max_ttl: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_key_bytes", "max_value_bytes", "max_subkeys_per_key", "max_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_total_bytes < ENTRY_OVERHEAD_BYTES:
            raise ValueError(
                f"max_total_bytes must be >= {ENTRY_OVERHEAD_BYTES}, got {self.max_total_bytes!r}"
            )
        if not (self.max_ttl > 0 and math.isfinite(self.max_ttl)):
            raise ValueError(f"max_ttl must be finite and > 0, got {self.max_ttl!r}")


@dataclass(frozen=True, slots=True)
class _Slot:
    entry: SignedEntry
    seq: int  # unique per stored entry; heap items carrying another seq are stale


class RecordStore:
    """``key -> {subkey -> SignedEntry}`` with signature checks, expiry and bounded size.

    When a bound would be exceeded, the entries expiring soonest are evicted first; a new entry
    that would itself be among them (ties: the older entry stays) is not stored.
    """

    def __init__(self, limits: RecordLimits | None = None) -> None:
        self.limits = limits or RecordLimits()
        # Never holds an empty inner dict.
        self._records: dict[str, dict[str, _Slot]] = {}
        # Min-heap of (expiration, -seq, key, subkey) covering every stored slot, plus stale
        # items (of replaced or evicted slots) dropped lazily when they reach the top.
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._entries = 0  # total slots
        self._bytes = 0  # sum of entry.size over slots

    def __len__(self) -> int:
        """The number of entries held (expired ones count until purged)."""
        return self._entries

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def store(self, entry: SignedEntry, now: float) -> bool:
        """Keep ``entry`` if it is newer than what its subkey holds; True if it was kept.

        Raises :class:`RecordRejected` for an entry that breaks a rule (see
        :class:`RejectReason`). Returns False for a valid entry that is not kept: not newer
        (equal expiration keeps the existing one), already expired, or no room because every
        entry it would have to evict expires later. A False return keeps every unexpired
        entry in place (expired ones may have been purged).
        """
        self._check_static(entry)
        if entry.expiration > now + self.limits.max_ttl:
            raise RecordRejected(
                RejectReason.TOO_FAR, f"expires {entry.expiration - now:.0f} s from now"
            )
        if entry.expiration <= now:
            return False
        self.purge(now)
        current = self._records.get(entry.key, {}).get(entry.subkey)
        if current is not None and current.entry.expiration >= entry.expiration:
            return False  # checked before the signature: stale entries cost no verification
        verify_entry(entry)
        seq = next(self._seq)
        victims = self._victims_for(entry, (entry.expiration, -seq))
        if victims is None:
            return False
        for key, subkey in victims:
            self._drop(key, subkey)
        self._records.setdefault(entry.key, {})[entry.subkey] = _Slot(entry, seq)
        heapq.heappush(self._heap, (entry.expiration, -seq, entry.key, entry.subkey))
        self._entries += 1
        self._bytes += entry.size
        self._compact()
        return True

    def get(self, key: str, now: float) -> dict[str, SignedEntry]:
        """The unexpired entries under ``key``, by subkey (empty if none)."""
        slots = self._records.get(key, {})
        return {sub: s.entry for sub, s in slots.items() if s.entry.expiration > now}

    def get_entry(self, key: str, subkey: str, now: float) -> SignedEntry | None:
        slot = self._records.get(key, {}).get(subkey)
        return slot.entry if slot is not None and slot.entry.expiration > now else None

    def items(self, now: float) -> Iterator[SignedEntry]:
        """Every unexpired entry (e.g. to hand over to a newly joined closer peer)."""
        for slots in self._records.values():
            for slot in slots.values():
                if slot.entry.expiration > now:
                    yield slot.entry

    def keys(self) -> list[str]:
        return list(self._records)

    def purge(self, now: float) -> int:
        """Drop every entry expired at ``now``; returns how many were dropped."""
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            if self._pop_soonest():
                dropped += 1
        self._compact()
        return dropped

    # -- internals -----------------------------------------------------------------------------

    def _check_static(self, entry: SignedEntry) -> None:
        if not isinstance(entry.key, str) or not entry.key:
            raise RecordRejected(RejectReason.MALFORMED, "key must be a non-empty str")
        if not isinstance(entry.value, bytes):
            raise RecordRejected(RejectReason.MALFORMED, "value must be bytes")
        if not isinstance(entry.expiration, float) or not math.isfinite(entry.expiration):
            raise RecordRejected(RejectReason.MALFORMED, "expiration must be a finite float")
        if len(entry.key.encode("utf-8")) > self.limits.max_key_bytes:
            raise RecordRejected(RejectReason.TOO_LARGE, "key too long")
        if len(entry.value) > self.limits.max_value_bytes:
            raise RecordRejected(RejectReason.TOO_LARGE, f"value of {len(entry.value)} bytes")

    def _drop(self, key: str, subkey: str) -> None:
        """Remove a stored slot (its heap item goes stale)."""
        slots = self._records[key]
        slot = slots.pop(subkey)
        if not slots:
            del self._records[key]
        self._entries -= 1
        self._bytes -= slot.entry.size

    def _pop_soonest(self) -> bool:
        """Pop the heap top; drop its slot if the item is current. True if a slot went."""
        _, neg_seq, key, subkey = heapq.heappop(self._heap)
        slot = self._records.get(key, {}).get(subkey)
        if slot is None or slot.seq != -neg_seq:
            return False
        self._drop(key, subkey)
        return True

    def _victims_for(
        self, entry: SignedEntry, rank: tuple[float, int]
    ) -> list[tuple[str, str]] | None:
        """What storing ``entry`` (whose heap rank is ``rank``) must drop: its old version, then
        soonest-expiring entries until every bound holds; None if one of those would rank
        after ``entry`` itself (then it is the one to go). Changes nothing but the heap's
        layout."""
        limits = self.limits
        if entry.size > limits.max_total_bytes:
            return None
        slots = self._records.get(entry.key, {})
        victims: dict[tuple[str, str], None] = {}  # ordered set
        freed_entries = freed_bytes = 0

        def take(key: str, subkey: str, slot: _Slot) -> None:
            nonlocal freed_entries, freed_bytes
            victims[(key, subkey)] = None
            freed_entries += 1
            freed_bytes += slot.entry.size

        if entry.subkey in slots:
            take(entry.key, entry.subkey, slots[entry.subkey])
        elif len(slots) >= limits.max_subkeys_per_key:
            # A few hundred subkeys at most: a linear scan beats a heap per key.
            sub = min(slots, key=lambda s: (slots[s].entry.expiration, -slots[s].seq))
            if (slots[sub].entry.expiration, -slots[sub].seq) > rank:
                return None
            take(entry.key, sub, slots[sub])
        popped: list[tuple[float, int, str, str]] = []
        while (
            self._entries - freed_entries + 1 > limits.max_entries
            or self._bytes - freed_bytes + entry.size > limits.max_total_bytes
        ):
            item = heapq.heappop(self._heap)
            popped.append(item)
            expiration, neg_seq, key, subkey = item
            slot = self._records.get(key, {}).get(subkey)
            if slot is None or slot.seq != -neg_seq or (key, subkey) in victims:
                continue  # stale item, or already counted
            if (expiration, neg_seq) > rank:
                for back in popped:  # undo: entry is not stored, nothing changes
                    heapq.heappush(self._heap, back)
                return None
            take(key, subkey, slot)
        # Popped items all belong to victims (or were stale): no need to push them back.
        return list(victims)

    def _compact(self) -> None:
        # Stale heap items pile up as entries are replaced; rebuild before they dominate.
        if len(self._heap) > 2 * self._entries + 64:
            self._heap = [
                (slot.entry.expiration, -slot.seq, key, sub)
                for key, slots in self._records.items()
                for sub, slot in slots.items()
            ]
            heapq.heapify(self._heap)
