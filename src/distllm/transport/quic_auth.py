"""The dialer's identity proof: how a QUIC server learns who connected to it.

TLS authenticates the server (its certificate key is pinned by the dialed PeerID, see
:mod:`distllm.transport.tls`). aioquic cannot demand a client certificate, so the client proves
its identity inside the encrypted connection instead: right after the handshake it sends, on its
first unidirectional stream, its public key and an Ed25519 signature over

    DOMAIN || server PeerID || client PeerID || len(odcid) || odcid || len(scid) || scid

where ``odcid`` is the connection's original destination connection ID (chosen by the client) and
``scid`` the server's initial source connection ID (chosen at random by the server). Naming the
server stops a relay to another server; the server-chosen ``scid`` stops a replay on a later
connection. Both IDs are authenticated by the TLS handshake (QUIC transport parameters).
"""

from __future__ import annotations

from distllm.errors import RemoteProtocolError
from distllm.identity import Identity, verify_signature
from distllm.ids import PeerID

__all__ = [
    "PROOF_SIZE",
    "PROOF_VERSION",
    "encode_proof",
    "proof_message",
    "verify_proof",
]

PROOF_VERSION = 1
_DOMAIN = b"distllm/1 quic client proof\x00"
_KEY_SIZE = 32
_SIGNATURE_SIZE = 64
#: version (1) + public key (32) + signature (64)
PROOF_SIZE = 1 + _KEY_SIZE + _SIGNATURE_SIZE


def proof_message(server: PeerID, client: PeerID, odcid: bytes, scid: bytes) -> bytes:
    """The exact bytes the client signs."""
    if len(odcid) > 255 or len(scid) > 255:
        raise ValueError("connection IDs are at most 255 bytes")
    return b"".join(
        (
            _DOMAIN,
            server.digest,
            client.digest,
            bytes((len(odcid),)),
            odcid,
            bytes((len(scid),)),
            scid,
        )
    )


def encode_proof(identity: Identity, server: PeerID, odcid: bytes, scid: bytes) -> bytes:
    """The proof frame ``identity`` sends to ``server`` on the connection named by the IDs."""
    signature = identity.sign(proof_message(server, identity.peer_id, odcid, scid))
    return bytes((PROOF_VERSION,)) + identity.public_key_bytes + signature


def verify_proof(frame: bytes, server: PeerID, odcid: bytes, scid: bytes) -> PeerID:
    """Check a proof frame received by ``server``; return the client's verified PeerID.

    Raises ``RemoteProtocolError`` if the frame is malformed or the signature does not verify.
    """
    if len(frame) != PROOF_SIZE:
        raise RemoteProtocolError(f"identity proof is {len(frame)} bytes, expected {PROOF_SIZE}")
    if frame[0] != PROOF_VERSION:
        raise RemoteProtocolError(f"unknown identity proof version {frame[0]}")
    key = frame[1 : 1 + _KEY_SIZE]
    signature = frame[1 + _KEY_SIZE :]
    client = PeerID.from_public_key(key)
    if not verify_signature(key, signature, proof_message(server, client, odcid, scid)):
        raise RemoteProtocolError(f"identity proof of {client!r} does not verify")
    return client
