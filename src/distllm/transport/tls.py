"""TLS identity for the QUIC transport: self-signed Ed25519 certificates pinned to PeerIDs.

There is no certificate authority. Each endpoint presents a self-signed X.509 certificate that
carries its long-term Ed25519 public key; TLS 1.3 (CertificateVerify) proves the server holds the
private key, and the dialer accepts the certificate iff that key hashes to the PeerID it dialed.
Names, issuer and validity dates carry no meaning and are never checked.
"""

from __future__ import annotations

import datetime
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from distllm.errors import PeerIdentityMismatch
from distllm.identity import Identity
from distllm.ids import PeerID

__all__ = [
    "ALPN",
    "certificate_peer_id",
    "certificate_public_key",
    "make_certificate",
    "verify_peer_certificate",
]

#: The one ALPN protocol id distllm peers speak; bump the digit on incompatible changes.
ALPN = "distllm/1"

#: Certificates are made per process; the window only has to cover clock skew and uptime.
_VALIDITY = datetime.timedelta(days=365)
_BACKDATE = datetime.timedelta(days=1)


def make_certificate(identity: Identity) -> x509.Certificate:
    """A fresh self-signed certificate over ``identity``'s Ed25519 key (subject = the PeerID)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.peer_id))])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .sign(identity.private_key, algorithm=None)  # Ed25519 signs without a separate hash
    )


def certificate_public_key(certificate: x509.Certificate) -> bytes:
    """The raw 32-byte Ed25519 key of ``certificate``; ``ValueError`` for any other key type."""
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"certificate key is {type(key).__name__}, not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_peer_id(certificate: x509.Certificate) -> PeerID:
    """The PeerID whose key ``certificate`` carries."""
    return PeerID.from_public_key(certificate_public_key(certificate))


def verify_peer_certificate(certificate: x509.Certificate, expected: PeerID) -> PeerID:
    """Return ``expected`` if ``certificate`` carries its key; else ``PeerIdentityMismatch``."""
    try:
        actual: object = certificate_peer_id(certificate)
    except ValueError as exc:
        actual = f"<{exc}>"
    if actual != expected:
        raise PeerIdentityMismatch(expected, actual)
    return expected
