"""The serving half of a DHT node: answers ``dht.*`` calls from its routing table and store.

A caller enters the routing table only through ``seen`` and only when the address it claims
belongs to the PeerID the transport authenticated (anyone can *claim* any address). Bad records
are answered with ``REJECTED`` and logged at debug level; the node keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from distllm.dht.messages import (
    METHOD_FIND_NODE,
    METHOD_FIND_VALUE,
    METHOD_PING,
    METHOD_STORE,
    Contact,
    FindNode,
    FindValue,
    Nodes,
    Ping,
    Pong,
    Store,
    StoreReply,
    StoreStatus,
    Values,
    check_target,
    entries_to_wire,
)
from distllm.dht.records import RecordRejected, RecordStore, SignedEntry, entry_from_wire
from distllm.dht.routing import RoutingTable, key_id
from distllm.errors import RemoteProtocolError
from distllm.ids import PeerAddress, PeerID
from distllm.rpc import RpcEndpoint

__all__ = ["MAX_STORE_BATCH", "DHTService"]

_log = logging.getLogger("distllm.dht")

#: Most entries one ``dht.store`` call may carry (each costs a signature check).
MAX_STORE_BATCH = 256


class DHTService:
    """Handlers of the four DHT methods over a node's ``table`` and ``records``.

    ``seen(address)`` is told of every caller that proved its claimed address; ``clock`` is
    the wall clock of record expirations; ``reply_bytes`` bounds the entries of one reply.
    """

    def __init__(
        self,
        table: RoutingTable,
        records: RecordStore,
        *,
        seen: Callable[[PeerAddress], None],
        clock: Callable[[], float],
        reply_bytes: int,
    ) -> None:
        self._table = table
        self._records = records
        self._seen = seen
        self._clock = clock
        self._reply_bytes = reply_bytes
        #: key -> anyio time of the last STORE that brought (or confirmed) entries under it.
        self.touched: dict[str, float] = {}

    def register(self, rpc: RpcEndpoint) -> None:
        rpc.add_unary(METHOD_PING, self.on_ping, Ping)
        rpc.add_unary(METHOD_FIND_NODE, self.on_find_node, FindNode)
        rpc.add_unary(METHOD_FIND_VALUE, self.on_find_value, FindValue)
        rpc.add_unary(METHOD_STORE, self.on_store, Store)

    async def on_ping(self, caller: PeerID, request: Ping) -> Pong:
        self._heard_from(caller, request.sender)
        return Pong()

    async def on_find_node(self, caller: PeerID, request: FindNode) -> Nodes:
        target = check_target(request.target)
        self._heard_from(caller, request.sender)
        return Nodes(self._nearest(target, caller))

    async def on_find_value(self, caller: PeerID, request: FindValue) -> Values:
        key = request.key
        if not key or len(key.encode("utf-8")) > self._records.limits.max_key_bytes:
            raise RemoteProtocolError(f"bad key of {len(key)} characters")
        self._heard_from(caller, request.sender)
        held = sorted(self._records.get(key, self._clock()).values(), key=lambda e: -e.expiration)
        budget, entries = self._reply_bytes, []
        for entry in held:  # latest expirations first, as many as one reply can carry
            budget -= entry.size
            if budget < 0:
                break
            entries.append(entry)
        return Values(self._nearest(key_id(key), caller), entries_to_wire(entries))

    async def on_store(self, caller: PeerID, request: Store) -> StoreReply:
        if len(request.entries) > MAX_STORE_BATCH:
            raise RemoteProtocolError(f"{len(request.entries)} entries in one dht.store")
        self._heard_from(caller, request.sender)
        statuses = []
        for item in request.entries:
            try:
                entry = entry_from_wire(item)
            except RemoteProtocolError as exc:
                _log.debug("dht.store from %r: %s", caller, exc)
                statuses.append(StoreStatus.REJECTED)
            else:
                statuses.append(self.store_local(entry, caller))
        return StoreReply(tuple(statuses))

    def store_local(self, entry: SignedEntry, source: PeerID) -> StoreStatus:
        """Offer ``entry`` (from ``source``) to this node's own store."""
        now = self._clock()
        try:
            kept = self._records.store(entry, now)
        except RecordRejected as exc:
            _log.debug("record from %r rejected: %s", source, exc)
            return StoreStatus.REJECTED
        held = self._records.get_entry(entry.key, entry.subkey, now)
        if kept or (held is not None and held.expiration >= entry.expiration):
            self.touched[entry.key] = anyio.current_time()
            return StoreStatus.STORED if kept else StoreStatus.CURRENT
        return StoreStatus.DROPPED

    def _heard_from(self, caller: PeerID, sender: Contact | None) -> None:
        if sender is None:
            return  # a client-mode node: never in anyone's table
        address = sender.address()
        if address.peer_id != caller:
            _log.debug("%r claims the address of %r: not added", caller, address.peer_id)
            return
        self._seen(address)

    def _nearest(self, target: bytes, caller: PeerID) -> tuple[Contact, ...]:
        # The caller knows itself; a slot spent on it could hide the node it looks for.
        nearest = self._table.nearest(target, exclude=caller)
        return tuple(Contact.of(entry.address) for entry in nearest)
