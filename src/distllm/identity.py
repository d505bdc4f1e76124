"""A peer's long-term Ed25519 key pair.

The key signs DHT records and the transport's identity proof; its public half hashes to the
peer's :class:`~distllm.ids.PeerID`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from distllm.ids import PeerID

__all__ = ["Identity", "verify_signature"]


class Identity:
    """An Ed25519 private key and the PeerID it proves."""

    __slots__ = ("_private_key", "peer_id", "public_key_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: PeerID = PeerID.from_public_key(self.public_key_bytes)

    @classmethod
    def generate(cls) -> Self:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Self:
        """A deterministic identity from a 32-byte seed (tests, reproducible swarms)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Load a key written by :meth:`save` (PEM, PKCS#8, unencrypted)."""
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_generate(cls, path: str | os.PathLike[str]) -> Self:
        """Load the identity at ``path``, creating and saving a new one if the file is absent."""
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PEM, readable only by its owner (mode 0600)."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode under O_CREAT
            os.write(fd, pem)
        finally:
            os.close(fd)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._private_key

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id!r})"


def verify_signature(public_key_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` by that key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
