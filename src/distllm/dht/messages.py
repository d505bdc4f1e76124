"""The DHT's RPC messages and their validation (pure; ``docs/protocol.md`` §7).

Four unary methods: ``dht.ping``, ``dht.find_node``, ``dht.find_value``, ``dht.store``. Every
request names its sender's dialable address, or ``None`` for a node in client mode (it serves
no DHT calls and must not be added to routing tables). Entries travel in the 6-item form of
:func:`~distllm.dht.records.entry_to_wire`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

from distllm.dht.records import SignedEntry, entry_from_wire, entry_to_wire
from distllm.errors import RemoteProtocolError
from distllm.ids import PEER_ID_BYTES, PeerAddress, PeerID
from distllm.wire.messages import message

__all__ = [
    "METHOD_FIND_NODE",
    "METHOD_FIND_VALUE",
    "METHOD_PING",
    "METHOD_STORE",
    "Contact",
    "FindNode",
    "FindValue",
    "Nodes",
    "Ping",
    "Pong",
    "Store",
    "StoreReply",
    "StoreStatus",
    "Values",
    "check_target",
    "contacts_to_addresses",
    "entries_from_wire",
    "entries_to_wire",
]

METHOD_PING = "dht.ping"
METHOD_FIND_NODE = "dht.find_node"
METHOD_FIND_VALUE = "dht.find_value"
METHOD_STORE = "dht.store"


@message("dht.contact")
@dataclass(frozen=True, slots=True)
class Contact:
    """A peer and where to dial it (a :class:`~distllm.ids.PeerAddress` on the wire)."""

    peer_id: PeerID
    host: str
    port: int

    @classmethod
    def of(cls, address: PeerAddress) -> Self:
        return cls(address.peer_id, address.host, address.port)

    def address(self) -> PeerAddress:
        """The address; ``RemoteProtocolError`` if the peer sent an impossible one."""
        try:
            return PeerAddress(self.peer_id, self.host, self.port)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad contact: {exc}") from None


@message("dht.ping")
@dataclass(frozen=True, slots=True)
class Ping:
    sender: Contact | None


@message("dht.pong")
@dataclass(frozen=True, slots=True)
class Pong:
    pass


@message("dht.find_node")
@dataclass(frozen=True, slots=True)
class FindNode:
    sender: Contact | None
    #: A 32-byte position in the id space.
    target: bytes


@message("dht.nodes")
@dataclass(frozen=True, slots=True)
class Nodes:
    """Reply to ``dht.find_node``: the callee's contacts nearest the target, nearest first."""

    peers: tuple[Contact, ...]


@message("dht.find_value")
@dataclass(frozen=True, slots=True)
class FindValue:
    sender: Contact | None
    key: str


@message("dht.values")
@dataclass(frozen=True, slots=True)
class Values:
    """Reply to ``dht.find_value``: the unexpired entries held under the key (possibly none)
    and the callee's contacts nearest the key."""

    peers: tuple[Contact, ...]
    entries: tuple[Any, ...]


@message("dht.store")
@dataclass(frozen=True, slots=True)
class Store:
    sender: Contact | None
    entries: tuple[Any, ...]


class StoreStatus(enum.StrEnum):
    STORED = "stored"  # kept
    CURRENT = "current"  # this entry, or a newer one for its subkey, is already held
    DROPPED = "dropped"  # valid but not kept: expired, or no room for it
    REJECTED = "rejected"  # broke a rule (malformed, bad signature, too large, too far)


@message("dht.stored")
@dataclass(frozen=True, slots=True)
class StoreReply:
    """One status per entry of the request, in order."""

    statuses: tuple[StoreStatus, ...]


def contacts_to_addresses(contacts: Iterable[Contact]) -> list[PeerAddress]:
    return [contact.address() for contact in contacts]


def entries_to_wire(entries: Iterable[SignedEntry]) -> tuple[Any, ...]:
    return tuple(entry_to_wire(entry) for entry in entries)


def entries_from_wire(items: Iterable[object]) -> list[SignedEntry]:
    """Parse entries (signatures unchecked); ``RemoteProtocolError`` on a malformed one."""
    return [entry_from_wire(item) for item in items]


def check_target(target: bytes) -> bytes:
    if len(target) != PEER_ID_BYTES:
        raise RemoteProtocolError(f"a target is {PEER_ID_BYTES} bytes, got {len(target)}")
    return target
