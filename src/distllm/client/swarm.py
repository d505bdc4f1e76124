"""The client's picture of the swarm serving one model (pure: entries and ``now`` come in).

Built from the signed server announcements found under the model's block keys
(:mod:`distllm.dht.schema`). Every server re-signs its whole announcement each period with
expiration ``now + ttl``, so for one peer the entry that expires last is its newest word: the
view keeps, per peer, the newest record it has seen (a server that moved or went OFFLINE is
judged by that record alone, even while older copies linger under other blocks) and routes only
through servers whose newest record is ONLINE, unexpired and dialable.

Round-trip times are measured by the async client and handed in with :meth:`SwarmView.set_rtt`;
a peer not measured yet counts :data:`DEFAULT_RTT` (0.15 s, Petals' figure: a typical Internet
round trip, so an unmeasured server is neither favoured nor shunned).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType

from distllm.dht.records import SignedEntry, verify_entry
from distllm.dht.schema import (
    MAX_BLOCKS,
    ServerRecord,
    ServerState,
    block_key,
    decode_server_entry,
    validate_model_name,
)
from distllm.errors import RemoteProtocolError
from distllm.ids import PeerAddress, PeerID

__all__ = ["DEFAULT_RTT", "ServerInfo", "SwarmView"]

#: Seconds assumed for the round trip to a server not measured yet.
DEFAULT_RTT = 0.15


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One routable server: its newest (ONLINE) announcement, as the client uses it."""

    record: ServerRecord
    addresses: tuple[PeerAddress, ...]  # record.addresses parsed; never empty
    start: int  # the record's span clipped to the model: 0 <= start < end <= num_blocks
    end: int
    expiration: float  # wall-clock time the announcement expires

    @property
    def peer(self) -> PeerID:
        return self.record.peer_id

    @property
    def address(self) -> PeerAddress:
        """The address to dial first (the server lists its preferred one first)."""
        return self.addresses[0]

    @property
    def inference_rps(self) -> float:
        return self.record.inference_rps

    @property
    def forward_rps(self) -> float:
        return self.record.forward_rps

    @property
    def free_cache_tokens(self) -> int:
        return self.record.free_cache_tokens

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the adapters the server announces it has loaded."""
        return self.record.adapters

    def holds(self, block: int) -> bool:
        return self.start <= block < self.end

    def serves(self, adapter: str | None) -> bool:
        """Can it run its blocks with ``adapter`` (``None``: the plain blocks, always)?"""
        return adapter is None or adapter in self.record.adapters


@dataclass(frozen=True, slots=True)
class _Newest:
    expiration: float
    value: bytes  # the encoded record: breaks ties between equal expirations deterministically
    record: ServerRecord


class SwarmView:
    """Servers of ``model`` (``num_blocks`` blocks) known to the client, and RTTs to them."""

    def __init__(self, model: str, num_blocks: int, *, default_rtt: float = DEFAULT_RTT) -> None:
        validate_model_name(model)
        if not (isinstance(num_blocks, int) and 1 <= num_blocks <= MAX_BLOCKS):
            raise ValueError(f"num_blocks must be an int in 1..{MAX_BLOCKS}, got {num_blocks!r}")
        self.model = model
        self.num_blocks = num_blocks
        self.default_rtt = _check_rtt(default_rtt)
        # Newest unexpired record per peer, whatever its state: an OFFLINE record must keep
        # masking the older ONLINE copies that other replicas may still hand us.
        self._newest: dict[PeerID, _Newest] = {}
        self._rtts: dict[PeerID, float] = {}  # kept across updates; finite, >= 0
        # Derived from _newest by _rebuild(): routable servers sorted by peer id, and per block.
        self._servers: dict[PeerID, ServerInfo] = {}
        self._by_block: list[list[ServerInfo]] = [[] for _ in range(num_blocks)]

    @classmethod
    def from_entries(
        cls,
        model: str,
        num_blocks: int,
        entries_by_block: Mapping[int, Iterable[SignedEntry]],
        now: float,
        *,
        verify: bool = True,
        default_rtt: float = DEFAULT_RTT,
    ) -> SwarmView:
        view = cls(model, num_blocks, default_rtt=default_rtt)
        view.update(entries_by_block, now, verify=verify)
        return view

    # -- updates -------------------------------------------------------------------------------

    def update(
        self,
        entries_by_block: Mapping[int, Iterable[SignedEntry]],
        now: float,
        *,
        verify: bool = True,
    ) -> int:
        """Merge DHT entries found under this model's block keys; returns how many were invalid.

        ``entries_by_block[b]`` holds what a lookup of block ``b``'s key returned. Invalid
        entries (bad signature, wrong key, malformed record, another model's) are dropped and
        counted; ``verify=False`` skips the signature check for entries already verified.
        Records expired at ``now`` are forgotten.
        """
        invalid = 0
        for block, entries in entries_by_block.items():
            key = block_key(self.model, block) if 0 <= block < self.num_blocks else None
            for entry in entries:
                record = self._accept(entry, key, verify)
                if record is None:
                    invalid += 1
                elif entry.expiration > now:
                    self._offer(_Newest(entry.expiration, entry.value, record))
        self.expire(now)
        return invalid

    def expire(self, now: float) -> None:
        """Forget every announcement expired at ``now`` (the server stopped refreshing it)."""
        self._newest = {p: n for p, n in self._newest.items() if n.expiration > now}
        self._rebuild()

    def set_rtt(self, peer: PeerID, seconds: float) -> None:
        """Record a measured round-trip time to ``peer`` (kept across updates)."""
        self._rtts[peer] = _check_rtt(seconds)

    # -- queries -------------------------------------------------------------------------------

    @property
    def servers(self) -> Mapping[PeerID, ServerInfo]:
        """Routable servers by peer id, in peer id order."""
        return MappingProxyType(self._servers)

    def rtt(self, peer: PeerID) -> float:
        return self._rtts.get(peer, self.default_rtt)

    def unmeasured(self) -> list[PeerID]:
        """Routable servers with no measured RTT yet (whom the client should ping)."""
        return [peer for peer in self._servers if peer not in self._rtts]

    def servers_for_block(self, block: int) -> list[ServerInfo]:
        """Routable servers holding ``block``, in peer id order."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in 0..{self.num_blocks - 1}, got {block!r}")
        return list(self._by_block[block])

    def uncovered_blocks(
        self,
        start: int = 0,
        end: int | None = None,
        *,
        excluding: Set[PeerID] = frozenset(),
        adapter: str | None = None,
    ) -> list[int]:
        """Blocks of ``[start, end)`` (default: the whole model) that no routable server outside
        ``excluding`` holds (with ``adapter`` loaded, when one is named)."""
        end = self.num_blocks if end is None else end
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"range [{start}, {end}) is not within 0..{self.num_blocks}")
        return [
            b
            for b in range(start, end)
            if all(info.peer in excluding or not info.serves(adapter) for info in self._by_block[b])
        ]

    # -- internals -----------------------------------------------------------------------------

    def _accept(self, entry: SignedEntry, key: str | None, verify: bool) -> ServerRecord | None:
        """The record in ``entry`` if it is a valid announcement under ``key``, else None."""
        if key is None or entry.key != key:
            return None
        try:
            if verify:
                verify_entry(entry)
            record = decode_server_entry(entry)  # also checks it is the signer's own record
        except RemoteProtocolError:
            return None
        return record if record.model == self.model else None

    def _offer(self, candidate: _Newest) -> None:
        current = self._newest.get(candidate.record.peer_id)
        if current is None or (candidate.expiration, candidate.value) > (
            current.expiration,
            current.value,
        ):
            self._newest[candidate.record.peer_id] = candidate

    def _rebuild(self) -> None:
        self._servers = {}
        self._by_block = [[] for _ in range(self.num_blocks)]
        for peer in sorted(self._newest):
            info = self._routable(self._newest[peer])
            if info is None:
                continue
            self._servers[peer] = info
            for block in range(info.start, info.end):
                self._by_block[block].append(info)

    def _routable(self, newest: _Newest) -> ServerInfo | None:
        record = newest.record
        if record.state is not ServerState.ONLINE or record.start >= self.num_blocks:
            return None
        # The schema checked that every address parses and names this peer.
        addresses = tuple(PeerAddress.parse(text) for text in record.addresses)
        if not addresses:
            return None  # announced but not dialable (e.g. behind NAT with no relay)
        end = min(record.end, self.num_blocks)
        return ServerInfo(record, addresses, record.start, end, newest.expiration)


def _check_rtt(seconds: float) -> float:
    if isinstance(seconds, bool) or not (
        isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0
    ):
        raise ValueError(f"an RTT must be a finite number of seconds >= 0, got {seconds!r}")
    return float(seconds)
