"""A Kademlia DHT node over RPC (layer L4): signed, expiring records; bootstrap; upkeep.

The decisions live in the pure cores (:mod:`~distllm.dht.routing`, :mod:`~distllm.dht.lookup`,
:mod:`~distllm.dht.records`); this module wires them to the network:

- it serves ``dht.ping``/``find_node``/``find_value``/``store`` (unless in client mode) and adds
  a caller to the routing table only when the address it claims belongs to the PeerID the
  transport authenticated;
- lookups run α queries in parallel (:func:`~distllm.dht.driver.run_lookup`), every call under
  ``call_timeout``; a failing or lying peer is charged and the lookup goes on;
- a background task purges expired records, refreshes idle buckets and republishes records
  held for others. Re-storing one's *own* records before they expire is the owner's job.

Two clocks: routing and deadlines use anyio's (monotonic, mockable); record expirations are
wall-clock times (``clock``, default ``time.time``) because they travel between machines.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from types import TracebackType
from typing import Self, TypeVar

import anyio
import anyio.abc

from distllm.config import DHTConfig
from distllm.dht.driver import DHTStats, map_bounded, run_lookup
from distllm.dht.entries import (
    Entries,
    accept_entries,
    check_key,
    check_own,
    merge,
    store_batches,
)
from distllm.dht.lookup import Lookup, LookupMode, LookupResult
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
    contacts_to_addresses,
    entries_to_wire,
)
from distllm.dht.records import (
    RecordLimits,
    RecordStore,
    SignedEntry,
)
from distllm.dht.routing import BucketView, RoutingEntry, RoutingTable, key_id
from distllm.dht.service import MAX_STORE_BATCH, DHTService
from distllm.errors import DistllmError, PeerIdentityMismatch, RemoteProtocolError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.rpc import RpcEndpoint, UnknownMethod

__all__ = ["DHTNode", "DHTStats", "RoutingView"]

_log = logging.getLogger("distllm.dht")

R = TypeVar("R")

#: Most liveness pings of full-bucket contacts in flight; beyond, newcomers just wait.
_MAX_PINGS = 32
#: A full bucket whose least recently seen contact answered within this many seconds is all
#: alive: a newcomer then waits in the replacement cache without a ping.
_FRESH_CONTACT = 30.0
#: Most background cache stores (after ``get``) in flight; beyond, caching is skipped.
_MAX_CACHE_TASKS = 32
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


class RoutingView:
    """Read-only view of a node's routing table (tests, metrics)."""

    __slots__ = ("_table",)

    def __init__(self, table: RoutingTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, peer: object) -> bool:
        return peer in self._table

    def __iter__(self) -> Iterator[RoutingEntry]:
        return iter(self._table)

    def get(self, peer: PeerID) -> RoutingEntry | None:
        return self._table.get(peer)

    def nearest(self, target: bytes | PeerID, k: int | None = None) -> list[RoutingEntry]:
        return self._table.nearest(target, k)

    def buckets(self) -> list[BucketView]:
        return self._table.buckets()


class DHTNode:
    """One node of the swarm's DHT; an async context manager owning one task group.

    Entering registers the ``dht.*`` methods on ``rpc`` (not in client mode), starts the
    background upkeep and, given ``initial_peers``, bootstraps. ``public_address`` is the
    address announced to others when the transport listens on a wildcard host.
    """

    def __init__(
        self,
        rpc: RpcEndpoint,
        identity: Identity,
        *,
        initial_peers: Sequence[PeerAddress] = (),
        config: DHTConfig = DHTConfig(),  # noqa: B008 (frozen, shared on purpose)
        client_mode: bool = False,
        public_address: PeerAddress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if identity.peer_id != rpc.peer_id:
            raise ValueError(f"{identity!r} is not the identity of the RPC endpoint")
        if public_address is not None and public_address.peer_id != identity.peer_id:
            raise ValueError(f"public_address {public_address} is not {identity.peer_id!r}'s")
        self._rpc = rpc
        self._identity = identity
        self._config = config
        self._client_mode = client_mode
        self._public_address = public_address
        self._clock = clock
        self._initial = tuple(a for a in initial_peers if a.peer_id != identity.peer_id)
        self._table = RoutingTable(identity.peer_id, config.k)
        self._records = RecordStore(
            RecordLimits(
                max_value_bytes=config.max_value_bytes,
                max_subkeys_per_key=config.max_subkeys_per_key,
                max_entries=config.max_records,
                max_total_bytes=config.max_record_bytes,
                max_ttl=config.max_ttl,
            )
        )
        self._service = DHTService(
            self._table,
            self._records,
            seen=self._claimed,
            clock=clock,
            reply_bytes=rpc.config.limits.max_header_bytes // 2,  # the rest: CBOR overhead
        )
        self._rng = random.Random(int(identity.peer_id))  # reproducible refresh targets
        self._pinging: set[PeerID] = set()  # contacts with a liveness ping in flight
        self._caching = 0  # background cache stores in flight
        self._tg: anyio.abc.TaskGroup | None = None
        self._running = False
        #: Counters over every lookup this node ran.
        self.stats = DHTStats()

    # -- properties ----------------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerID:
        return self._identity.peer_id

    @property
    def address(self) -> PeerAddress:
        """The address this node announces (``public_address``, else the transport's)."""
        return self._public_address or self._rpc.address

    @property
    def client_mode(self) -> bool:
        return self._client_mode

    @property
    def config(self) -> DHTConfig:
        return self._config

    @property
    def routing_table(self) -> RoutingView:
        return RoutingView(self._table)

    def local_entries(self, key: str) -> Entries:
        """The unexpired entries this node itself holds under ``key``."""
        return self._records.get(key, self._clock())

    @property
    def record_count(self) -> int:
        """Entries held for the swarm (expired ones count until the next purge)."""
        return len(self._records)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("a DHTNode can be entered only once")
        if not self._client_mode:
            if self.address.host in _WILDCARD_HOSTS:
                raise ValueError(
                    f"the transport listens on {self.address.host!r}: pass public_address"
                )
            self._service.register(self._rpc)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._running = True
        try:
            tg.start_soon(self._maintain)
            if self._initial:
                await self.bootstrap()
        except BaseException as exc:
            self._running = False
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None  # entered
        self._running = False
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(exc_type, exc, tb)

    # -- public API ----------------------------------------------------------------------------

    async def bootstrap(self, initial_peers: Sequence[PeerAddress] | None = None) -> None:
        """Join through ``initial_peers``: ping them, look up our own id, refresh the buckets.

        Given here, ``initial_peers`` replace those given to the constructor. Never raises for
        unreachable peers: it logs, and the upkeep task retries while the table is empty.
        """
        if initial_peers is not None:
            self._initial = tuple(a for a in initial_peers if a.peer_id != self.peer_id)
        answered = await map_bounded(self._initial, self._ping, self._config.parallelism)
        if self._initial and not any(answered) and not len(self._table):
            _log.warning("DHT bootstrap: none of %d initial peers answered", len(self._initial))
            return
        await self._lookup(self.peer_id.digest)
        await self._refresh_buckets()

    async def find_nodes(self, target: bytes) -> list[PeerAddress]:
        """The (up to ``k``) live nodes closest to a 32-byte ``target``, nearest first."""
        result = await self._lookup(check_target(bytes(target)))
        return list(result.closest)

    async def store(self, entry: SignedEntry) -> int:
        """Store ``entry`` at the ``replication`` nodes closest to its key (this one included,
        unless in client mode); returns how many hold it (or a newer one) afterwards.

        Raises ``ValueError`` for an entry no node would accept (bad signature, too large,
        expiring beyond ``max_ttl``).
        """
        check_own(entry, self._records.limits, self._clock())
        return (await self._replicate(entry.key, [entry]))[0]

    async def store_many(self, entries: Sequence[SignedEntry]) -> list[int]:
        """:meth:`store` for each entry (one lookup per distinct key), ``parallelism`` keys at
        a time; the counts come back in the order of ``entries``."""
        by_key: dict[str, list[int]] = {}
        for index, entry in enumerate(entries):
            # Every entry is checked before anything is sent.
            check_own(entry, self._records.limits, self._clock())
            by_key.setdefault(entry.key, []).append(index)
        counts = [0] * len(entries)

        async def store_group(key: str) -> None:
            indices = by_key[key]
            got = await self._replicate(key, [entries[i] for i in indices])
            for index, count in zip(indices, got, strict=True):
                counts[index] = count

        await map_bounded(list(by_key), store_group, self._config.parallelism)
        return counts

    async def get(self, key: str) -> Entries:
        """The unexpired entries under ``key`` (subkey -> entry), merged from the nodes that
        hold it (newest expiration per subkey); every entry's signature is verified."""
        check_key(key)
        result = await self._lookup(key_id(key), key)
        merged = self.local_entries(key) if not self._client_mode else {}
        for _, found in result.values:
            merge(merged, found.values())
        now = self._clock()
        merged = {sub: e for sub, e in merged.items() if e.expiration > now}
        if self._config.cache_on_get and merged and result.without_value:
            self._cache(result.without_value[0], list(merged.values()))
        return merged

    async def get_many(
        self, keys: Sequence[str], *, parallelism: int | None = None
    ) -> dict[str, Entries]:
        """:meth:`get` for each distinct key, at most ``parallelism`` (default from the
        config) lookups at once."""
        unique = list(dict.fromkeys(keys))
        for key in unique:
            check_key(key)
        limit = self._config.parallelism if parallelism is None else parallelism
        if limit < 1:
            raise ValueError(f"parallelism must be >= 1, got {limit!r}")
        found = await map_bounded(unique, self.get, limit)
        return dict(zip(unique, found, strict=True))

    # -- routing table upkeep ------------------------------------------------------------------

    def _seen(self, address: PeerAddress) -> None:
        """We reached ``address.peer_id`` at ``address`` over the authenticated transport.

        The transport may have reused a live connection to that peer, so a call that succeeded
        does not prove the address (a liar can name a real peer at a made-up one): for a
        contact already known, only its liveness is refreshed. Its own claim (the ``sender``
        of its calls) is what moves it.
        """
        known = self._table.get(address.peer_id)
        self._claimed(address if known is None else known.address)

    def _claimed(self, address: PeerAddress) -> None:
        """``address.peer_id`` is alive and says (authenticated) that it is at ``address``."""
        now = anyio.current_time()
        oldest = self._table.on_seen(address.peer_id, address, now)
        if (
            oldest is not None
            and now - oldest.last_seen >= _FRESH_CONTACT
            and oldest.peer_id not in self._pinging
            and len(self._pinging) < _MAX_PINGS
            and self._running
            and self._tg is not None
        ):
            # The bucket is full: the newcomer waits unless the oldest contact is gone.
            self._pinging.add(oldest.peer_id)
            self._tg.start_soon(self._check_alive, oldest.address)

    async def _check_alive(self, address: PeerAddress) -> None:
        try:
            await self._ping(address)
        finally:
            self._pinging.discard(address.peer_id)

    def _failed(self, address: PeerAddress, error: DistllmError) -> None:
        _log.debug("DHT call to %r at %s failed: %r", address.peer_id, address, error)
        known = self._table.get(address.peer_id)
        if known is None or known.address != address:
            return  # not our contact's address (maybe a liar's referral): nobody to charge
        if isinstance(error, UnknownMethod | PeerIdentityMismatch):
            self._table.remove(address.peer_id)  # not (or no longer) a DHT node at that address
        else:
            self._table.on_failure(address.peer_id, anyio.current_time())

    async def _ping(self, address: PeerAddress) -> bool:
        try:
            await self._call(address, METHOD_PING, Ping(self._sender()), Pong)
        except DistllmError as exc:
            self._failed(address, exc)
            return False
        self._seen(address)
        return True

    # -- lookups -------------------------------------------------------------------------------

    async def _lookup(self, target: bytes, key: str | None = None) -> LookupResult[Entries]:
        """FIND_NODE (``key`` None) or FIND_VALUE for ``key``; ``target`` is its position."""
        config = self._config
        initial = [entry.address for entry in self._table.nearest(target)]
        lookup: Lookup[Entries] = Lookup(
            target,
            initial or self._initial,  # an empty table: start over from the initial peers
            k=config.k,
            alpha=config.alpha,
            mode=LookupMode.FIND_NODE if key is None else LookupMode.FIND_VALUE,
            quorum=config.get_quorum,
            local_id=self.peer_id,
        )
        query = partial(self._find_node, target) if key is None else partial(self._find_value, key)
        await run_lookup(
            lookup,
            query,
            on_reply=self._seen,
            on_failure=self._failed,
            timeout=config.lookup_timeout,
        )
        self._table.mark_lookup(target, anyio.current_time())
        self.stats.add(lookup.stats)
        return lookup.result

    async def _find_node(
        self, target: bytes, address: PeerAddress
    ) -> tuple[list[PeerAddress], Entries | None]:
        reply = await self._call(address, METHOD_FIND_NODE, FindNode(self._sender(), target), Nodes)
        return contacts_to_addresses(reply.peers[: self._config.k]), None

    async def _find_value(
        self, key: str, address: PeerAddress
    ) -> tuple[list[PeerAddress], Entries | None]:
        reply = await self._call(address, METHOD_FIND_VALUE, FindValue(self._sender(), key), Values)
        peers = contacts_to_addresses(reply.peers[: self._config.k])
        found = accept_entries(key, reply.entries, self._records.limits, self._clock())
        return peers, found or None

    async def _refresh_buckets(self) -> None:
        now = anyio.current_time()
        targets = self._table.buckets_to_refresh(now, self._config.refresh_interval, self._rng)
        await map_bounded(targets, self._lookup, self._config.parallelism)

    # -- storing -------------------------------------------------------------------------------

    async def _replicate(self, key: str, entries: list[SignedEntry]) -> list[int]:
        """Push ``entries`` (all under ``key``) to the ``replication`` closest nodes."""
        target = key_id(key)
        result = await self._lookup(target)
        holders = list(result.closest)
        if not self._client_mode:
            holders.append(self.address)
        holders.sort(key=lambda a: a.peer_id.xor_distance(target))
        counts = [0] * len(entries)
        async with anyio.create_task_group() as tg:
            for address in holders[: self._config.replication]:
                if address.peer_id == self.peer_id:
                    for index, entry in enumerate(entries):
                        status = self._service.store_local(entry, self.peer_id)
                        counts[index] += int(status in _ACCEPTED)
                else:
                    tg.start_soon(self._push, address, entries, counts)
        return counts

    async def _push(
        self, address: PeerAddress, entries: Sequence[SignedEntry], counts: list[int]
    ) -> None:
        """``dht.store`` ``entries`` at ``address`` in batches; ``counts[i]`` += 1 for each
        entry it accepted."""
        budget = self._rpc.config.limits.max_header_bytes // 2  # the rest: CBOR overhead
        for start, batch in store_batches(entries, MAX_STORE_BATCH, budget):
            request = Store(self._sender(), entries_to_wire(batch))
            try:
                reply = await self._call(address, METHOD_STORE, request, StoreReply)
                if len(reply.statuses) != len(batch):
                    raise RemoteProtocolError(
                        f"{len(reply.statuses)} statuses for {len(batch)} entries"
                    )
            except DistllmError as exc:
                self._failed(address, exc)
                return
            self._seen(address)
            for offset, status in enumerate(reply.statuses):
                counts[start + offset] += int(status in _ACCEPTED)

    def _cache(self, address: PeerAddress, entries: list[SignedEntry]) -> None:
        if not self._running or self._tg is None or self._caching >= _MAX_CACHE_TASKS:
            return
        self._caching += 1
        self._tg.start_soon(self._cache_at, address, entries)

    async def _cache_at(self, address: PeerAddress, entries: list[SignedEntry]) -> None:
        try:
            await self._push(address, entries, [0] * len(entries))
        finally:
            self._caching -= 1

    # -- background upkeep ---------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await anyio.sleep(self._config.maintenance_interval)
            await self.maintain_once()

    async def maintain_once(self) -> None:
        """One round of upkeep (the background task runs it every ``maintenance_interval``):
        purge expired records, rejoin if alone, refresh idle buckets, republish."""
        self._records.purge(self._clock())
        if not len(self._table) and self._initial:
            await self.bootstrap()
            return
        await self._refresh_buckets()
        await self._republish()

    async def _republish(self) -> None:
        held = set(self._records.keys())
        touched = self._service.touched
        for key in [k for k in touched if k not in held]:
            del touched[key]  # bounded by the store, whatever the interval
        interval = self._config.republish_interval
        if interval == 0 or self._client_mode:
            return
        now = anyio.current_time()
        due = [k for k in held if now - touched.get(k, -interval) >= interval]
        wall = self._clock()

        async def republish(key: str) -> None:
            entries = list(self._records.get(key, wall).values())
            if entries:
                await self._replicate(key, entries)
            touched[key] = anyio.current_time()

        await map_bounded(due, republish, self._config.parallelism)

    # -- calls ---------------------------------------------------------------------------------

    def _sender(self) -> Contact | None:
        return None if self._client_mode else Contact.of(self.address)

    async def _call(
        self, address: PeerAddress, method: str, request: object, response_type: type[R]
    ) -> R:
        return await self._rpc.call(
            address,
            method,
            request,
            timeout=self._config.call_timeout,
            response_type=response_type,
        )


_ACCEPTED = frozenset({StoreStatus.STORED, StoreStatus.CURRENT})
