"""Peer identifiers and dialable addresses (pure, stdlib only).

A :class:`PeerID` is the SHA-256 digest of a domain tag and the peer's raw Ed25519 public key.
Whoever holds the private key can prove it owns the ID; nobody can choose an ID at will.
Its 256-bit value doubles as the peer's Kademlia node id (xor metric).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Self

__all__ = ["PEER_ID_BYTES", "PeerAddress", "PeerID"]

PEER_ID_BYTES = 32
_DOMAIN = b"distllm-peer-id-v1\x00"
_SCHEME = "distllm://"


@dataclass(frozen=True, slots=True, order=True)
class PeerID:
    """A 32-byte peer identifier. Text form: 52 lowercase base32 characters, no padding."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != PEER_ID_BYTES:
            raise ValueError(f"a PeerID is exactly {PEER_ID_BYTES} bytes")

    @classmethod
    def from_public_key(cls, raw_public_key: bytes) -> Self:
        """Derive the ID of the owner of a raw 32-byte Ed25519 public key."""
        if len(raw_public_key) != 32:
            raise ValueError("an Ed25519 public key is exactly 32 bytes")
        return cls(hashlib.sha256(_DOMAIN + raw_public_key).digest())

    @classmethod
    def from_string(cls, text: str) -> Self:
        """Parse the text form produced by ``str(peer_id)``."""
        if not isinstance(text, str) or len(text) != 52:
            raise ValueError(f"not a peer id: {text!r}")
        try:
            digest = base64.b32decode(text.upper() + "====")
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not a peer id: {text!r}") from exc
        return cls(digest)

    def __str__(self) -> str:
        return base64.b32encode(self.digest).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"PeerID({str(self)[:12]}…)"

    def __int__(self) -> int:
        return int.from_bytes(self.digest, "big")

    def xor_distance(self, other: PeerID | bytes) -> int:
        """Kademlia distance to another id (or a raw 32-byte key)."""
        raw = other.digest if isinstance(other, PeerID) else other
        return int.from_bytes(self.digest, "big") ^ int.from_bytes(raw, "big")

    @property
    def short(self) -> str:
        """A short prefix for logs."""
        return str(self)[:8]


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where to reach a peer and who it must prove to be: ``distllm://<peer-id>@host:port``.

    IPv6 hosts are written in brackets: ``distllm://<peer-id>@[::1]:31337``.
    """

    peer_id: PeerID
    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``distllm://<peer-id>@host:port``; raises ``ValueError`` with the reason."""
        if not text.startswith(_SCHEME):
            raise ValueError(f"address must start with {_SCHEME!r}: {text!r}")
        rest = text[len(_SCHEME) :]
        peer_text, sep, hostport = rest.partition("@")
        if not sep:
            raise ValueError(f"address lacks '<peer-id>@': {text!r}")
        peer_id = PeerID.from_string(peer_text)
        if hostport.startswith("["):
            host, sep, port_text = hostport[1:].partition("]:")
        else:
            host, sep, port_text = hostport.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"address lacks ':port': {text!r}")
        return cls(peer_id, host, int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"{_SCHEME}{self.peer_id}@{host}:{self.port}"

    @property
    def socket_address(self) -> tuple[str, int]:
        return (self.host, self.port)


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
