from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distllm.identity import Identity, verify_signature
from distllm.ids import PeerAddress, PeerID

digests = st.binary(min_size=32, max_size=32)


@given(digests)
def test_peer_id_text_round_trip(digest: bytes) -> None:
    peer_id = PeerID(digest)
    text = str(peer_id)
    assert len(text) == 52
    assert text == text.lower()
    assert PeerID.from_string(text) == peer_id


@given(digests, digests, digests)
def test_xor_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    pa, pb, pc = PeerID(a), PeerID(b), PeerID(c)
    assert pa.xor_distance(pa) == 0
    assert pa.xor_distance(pb) == pb.xor_distance(pa)
    # xor satisfies the (stronger) ultrametric-like bound d(a,c) <= d(a,b) + d(b,c)
    assert pa.xor_distance(pc) <= pa.xor_distance(pb) + pb.xor_distance(pc)
    assert pa.xor_distance(b) == pa.xor_distance(pb)


@pytest.mark.parametrize("text", ["", "abc", "0" * 52, "A" * 51, "a" * 53, "!" * 52, "1" * 52])
def test_bad_peer_id_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a peer id"):
        PeerID.from_string(text)


def test_peer_id_requires_32_bytes() -> None:
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        PeerID(b"short")


def test_identity_derives_peer_id_from_public_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id == PeerID.from_public_key(identity.public_key_bytes)
    assert Identity.generate().peer_id != identity.peer_id


def test_identity_save_load_is_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "peer.key"
    identity = Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).peer_id == identity.peer_id
    # overwriting an existing, more permissive file tightens it
    path.chmod(0o644)
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_or_generate_is_stable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "id.pem"
    first = Identity.load_or_generate(path)
    assert Identity.load_or_generate(path).peer_id == first.peer_id


def test_identity_from_seed_is_deterministic() -> None:
    assert Identity.from_seed(b"\x01" * 32).peer_id == Identity.from_seed(b"\x01" * 32).peer_id
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_seed(b"\x01")


def test_signatures() -> None:
    identity = Identity.generate()
    sig = identity.sign(b"hello")
    assert verify_signature(identity.public_key_bytes, sig, b"hello")
    assert not verify_signature(identity.public_key_bytes, sig, b"hellO")
    assert not verify_signature(Identity.generate().public_key_bytes, sig, b"hello")
    assert not verify_signature(b"\x00" * 31, sig, b"hello")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "example.org", "fe80::1"])
def test_address_round_trip(host: str) -> None:
    peer_id = Identity.from_seed(b"\x02" * 32).peer_id
    address = PeerAddress(peer_id, host, 31337)
    text = str(address)
    assert text.startswith("distllm://")
    assert PeerAddress.parse(text) == address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://x@1.2.3.4:5", "must start with"),
        ("distllm://1.2.3.4:5", "lacks '<peer-id>@'"),
        ("distllm://{pid}@1.2.3.4", "lacks ':port'"),
        ("distllm://{pid}@1.2.3.4:http", "lacks ':port'"),
        ("distllm://{pid}@1.2.3.4:70000", "port must be in 1..65535"),
        ("distllm://{pid}@:5", "host must not be empty"),
        ("distllm://nope@1.2.3.4:5", "not a peer id"),
    ],
)
def test_bad_addresses(text: str, reason: str) -> None:
    pid = Identity.from_seed(b"\x03" * 32).peer_id
    with pytest.raises(ValueError, match=reason):
        PeerAddress.parse(text.format(pid=pid))
