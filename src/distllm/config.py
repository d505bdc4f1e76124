"""Frozen configuration records. Every field is documented; invalid values raise ``ValueError``
with a message naming the field, the rule and the value given."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DHTConfig", "RpcConfig", "TransportConfig", "WireLimits"]

MiB = 1024 * 1024


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds on what a peer may send us; anything larger is a ``RemoteProtocolError``
    (or ``LimitExceeded`` when we are the ones trying to send it)."""

    #: Largest frame (one encoded message, header and tensor payloads) in bytes.
    max_frame_bytes: int = 256 * MiB
    #: Largest CBOR header of a message (everything but the raw tensor payloads), in bytes.
    max_header_bytes: int = 1 * MiB
    #: Largest payload of one tensor, in bytes.
    max_tensor_bytes: int = 256 * MiB
    #: Most dimensions a tensor may have.
    max_tensor_dims: int = 8
    #: Most tensors one message may carry.
    max_tensors_per_message: int = 1024

    def __post_init__(self) -> None:
        _require(self.max_frame_bytes >= 1024, "max_frame_bytes", ">= 1024", self.max_frame_bytes)
        _require(
            0 < self.max_header_bytes <= self.max_frame_bytes,
            "max_header_bytes",
            "in 1..max_frame_bytes",
            self.max_header_bytes,
        )
        _require(self.max_tensor_bytes >= 0, "max_tensor_bytes", ">= 0", self.max_tensor_bytes)
        _require(
            1 <= self.max_tensor_dims <= 64, "max_tensor_dims", "in 1..64", self.max_tensor_dims
        )
        _require(
            self.max_tensors_per_message >= 0,
            "max_tensors_per_message",
            ">= 0",
            self.max_tensors_per_message,
        )


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Settings of a QUIC endpoint (and of the in-memory transport where they apply)."""

    #: Largest UDP datagram we send. 1200 is safe on any Internet path; ~9000 on jumbo-frame
    #: LANs; up to 16384 on loopback (aioquic does no path-MTU discovery).
    max_datagram_size: int = 1200
    #: Datagram size on connections whose peer is a loopback address (127.0.0.0/8, ::1): the
    #: path is this machine (MTU 64 KiB), and aioquic's cost is per packet, so bulk transfers
    #: between co-located processes run several times faster with big datagrams. The larger of
    #: this and ``max_datagram_size`` applies there.
    loopback_datagram_size: int = 16384
    #: Seconds allowed for dialing: QUIC + TLS handshake and the identity proof.
    connect_timeout: float = 5.0
    #: Seconds between keep-alive PINGs on a connection.
    keepalive_interval: float = 0.5
    #: A connection from which nothing (not even a PING acknowledgement) arrived for this many
    #: seconds is declared dead: every open stream on it fails with ``PeerGone``.
    dead_peer_timeout: float = 3.0
    #: A connection with no open streams for this many seconds is closed (0 = never).
    idle_timeout: float = 60.0
    #: Unacknowledged bytes one stream may have in flight before ``send`` waits (back-pressure).
    stream_send_window: int = 8 * MiB
    #: Bytes a receiver buffers per stream before it stops granting the sender more credit.
    stream_receive_window: int = 8 * MiB
    #: Requested kernel UDP socket buffer size (send and receive), in bytes.
    socket_buffer_bytes: int = 4 * MiB
    #: Most concurrently open streams a peer may have towards us on one connection.
    max_incoming_streams: int = 4096
    #: Pace outgoing packets (aioquic's pacer). Off doubles loopback throughput; on is gentler
    #: on real bottleneck links.
    pacing: bool = False

    def __post_init__(self) -> None:
        _require(
            1200 <= self.max_datagram_size <= 16384,
            "max_datagram_size",
            "in 1200..16384",
            self.max_datagram_size,
        )
        _require(
            1200 <= self.loopback_datagram_size <= 16384,
            "loopback_datagram_size",
            "in 1200..16384",
            self.loopback_datagram_size,
        )
        _require(self.connect_timeout > 0, "connect_timeout", "> 0", self.connect_timeout)
        _require(self.keepalive_interval > 0, "keepalive_interval", "> 0", self.keepalive_interval)
        _require(
            self.dead_peer_timeout > self.keepalive_interval,
            "dead_peer_timeout",
            "> keepalive_interval",
            self.dead_peer_timeout,
        )
        _require(self.idle_timeout >= 0, "idle_timeout", ">= 0", self.idle_timeout)
        _require(
            self.stream_send_window >= 65536,
            "stream_send_window",
            ">= 65536",
            self.stream_send_window,
        )
        _require(
            self.stream_receive_window >= 65536,
            "stream_receive_window",
            ">= 65536",
            self.stream_receive_window,
        )
        _require(
            self.socket_buffer_bytes >= 65536,
            "socket_buffer_bytes",
            ">= 65536",
            self.socket_buffer_bytes,
        )
        _require(
            self.max_incoming_streams >= 1,
            "max_incoming_streams",
            ">= 1",
            self.max_incoming_streams,
        )


@dataclass(frozen=True, slots=True)
class RpcConfig:
    """Settings of the RPC layer."""

    #: Deadline, in seconds, of a call that names none.
    default_timeout: float = 30.0
    #: Most RPC calls one peer may have running at our endpoint at once; more get ``Busy``.
    max_concurrent_calls_per_peer: int = 256
    #: Limits applied to every message received (and checked before sending).
    limits: WireLimits = WireLimits()

    def __post_init__(self) -> None:
        _require(self.default_timeout > 0, "default_timeout", "> 0", self.default_timeout)
        _require(
            self.max_concurrent_calls_per_peer >= 1,
            "max_concurrent_calls_per_peer",
            ">= 1",
            self.max_concurrent_calls_per_peer,
        )


@dataclass(frozen=True, slots=True)
class DHTConfig:
    """Settings of a DHT node (``distllm.dht.node.DHTNode``)."""

    #: Bucket size of the routing table, and how many closest peers a lookup converges on.
    k: int = 20
    #: Queries one lookup keeps in flight at once.
    alpha: int = 3
    #: How many of the nodes closest to a key each ``store`` writes to. 5: with a fifth of the
    #: nodes gone at once, a key is lost only if all 5 holders are among them (0.2**5 = 0.03%).
    replication: int = 5
    #: A ``get`` stops once this many nodes returned entries (their entries are merged);
    #: ``None``: ask all of the ``k`` closest (most complete, about twice the messages).
    get_quorum: int | None = 3
    #: Deadline, in seconds, of each call to a peer; a peer that misses it is charged a failure.
    call_timeout: float = 3.0
    #: Deadline, in seconds, of a whole lookup; at the deadline it returns what it has.
    lookup_timeout: float = 20.0
    #: Lookups or stores one ``get_many``/``store_many`` (or refresh) runs at once by default.
    parallelism: int = 16
    #: Seconds between runs of the background task (purge, bucket refresh, republish).
    maintenance_interval: float = 30.0
    #: A bucket no lookup went through for this many seconds is refreshed (random lookup in it).
    refresh_interval: float = 600.0
    #: Records held for others and not re-stored for this many seconds are pushed again to the
    #: nodes now closest to their key (0: never). Their owners re-store them anyway.
    republish_interval: float = 600.0
    #: After a ``get``, store what was found at the nearest node asked that lacked it.
    cache_on_get: bool = True
    #: Largest record value accepted, in bytes.
    max_value_bytes: int = 16 * 1024
    #: Seconds from now a record's expiration may lie at most (absorbs clock skew too).
    max_ttl: float = 3600.0
    #: Most records (entries) this node keeps for the swarm.
    max_records: int = 100_000
    #: Most bytes of records this node keeps for the swarm.
    max_record_bytes: int = 64 * MiB
    #: Most subkeys (owners) one key may have in this node's store.
    max_subkeys_per_key: int = 1024

    def __post_init__(self) -> None:
        _require(self.k >= 1, "k", ">= 1", self.k)
        _require(1 <= self.alpha <= self.k, "alpha", "in 1..k", self.alpha)
        _require(1 <= self.replication <= self.k, "replication", "in 1..k", self.replication)
        _require(
            self.get_quorum is None or self.get_quorum >= 1,
            "get_quorum",
            "None or >= 1",
            self.get_quorum,
        )
        _require(self.call_timeout > 0, "call_timeout", "> 0", self.call_timeout)
        _require(
            self.lookup_timeout >= self.call_timeout,
            "lookup_timeout",
            ">= call_timeout",
            self.lookup_timeout,
        )
        _require(self.parallelism >= 1, "parallelism", ">= 1", self.parallelism)
        _require(
            self.maintenance_interval > 0,
            "maintenance_interval",
            "> 0",
            self.maintenance_interval,
        )
        _require(self.refresh_interval > 0, "refresh_interval", "> 0", self.refresh_interval)
        _require(
            self.republish_interval >= 0,
            "republish_interval",
            ">= 0",
            self.republish_interval,
        )
        _require(self.max_value_bytes >= 1, "max_value_bytes", ">= 1", self.max_value_bytes)
        _require(
            self.max_ttl > 0 and self.max_ttl < float("inf"),
            "max_ttl",
            "finite and > 0",
            self.max_ttl,
        )
        _require(self.max_records >= 1, "max_records", ">= 1", self.max_records)
        _require(
            self.max_record_bytes >= 1024, "max_record_bytes", ">= 1024", self.max_record_bytes
        )
        _require(
            self.max_subkeys_per_key >= 1,
            "max_subkeys_per_key",
            ">= 1",
            self.max_subkeys_per_key,
        )
