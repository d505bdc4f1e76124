"""distllm's DHT records: validation, CBOR round-trips, strict decoding, entry consistency."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.dht.records import RecordStore, peer_subkey, sign_entry, verify_entry
from distllm.dht.schema import (
    MAX_BLOCKS,
    ModelRecord,
    ServerRecord,
    ServerState,
    block_key,
    block_keys,
    decode_model_entry,
    decode_model_record,
    decode_server_entry,
    decode_server_record,
    encode_model_record,
    encode_server_record,
    model_key,
    sign_model_record,
    sign_server_record,
    validate_model_name,
)
from distllm.errors import RemoteProtocolError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID

SERVER = Identity.from_seed(b"\x07" * 32)
OTHER = Identity.from_seed(b"\x08" * 32)
NOW = 1_700_000_000.0


def server_record(**changes: object) -> ServerRecord:
    fields: dict[str, object] = {
        "peer_id": SERVER.peer_id,
        "addresses": (f"distllm://{SERVER.peer_id}@127.0.0.1:31337",),
        "state": ServerState.ONLINE,
        "model": "SmolLM2-135M-Instruct",
        "start": 3,
        "end": 7,
        "throughput": 120.5,
        "inference_rps": 30.0,
        "forward_rps": 900,
        "free_cache_tokens": 65536,
        "dtype": "float16",
        "quantization": None,
        "adapters": (),
        "version": "0.1.0",
    }
    fields.update(changes)
    return ServerRecord(**fields)  # type: ignore[arg-type]


def model_record(**changes: object) -> ModelRecord:
    fields: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct",
        "num_blocks": 30,
        "config_repo": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "config_hash": bytes(range(32)),
    }
    fields.update(changes)
    return ModelRecord(**fields)  # type: ignore[arg-type]


# -- strategies ------------------------------------------------------------------------------

names = st.text(
    st.characters(categories=["L", "N", "P", "S"], exclude_characters="/"), min_size=1, max_size=24
)
model_names = st.builds(lambda a, b: f"{a}/{b}", names, names) | names.filter(
    lambda n: n != "models"
)
rates = st.floats(0, 1e12, allow_nan=False) | st.integers(0, 10**9)


@st.composite
def server_records(draw: st.DrawFn) -> ServerRecord:
    peer = PeerID(draw(st.binary(min_size=32, max_size=32)))
    hosts = st.sampled_from(["127.0.0.1", "::1", "example.org", "10.1.2.3"])
    addresses = draw(
        st.lists(st.builds(PeerAddress, st.just(peer), hosts, st.integers(1, 65535)), max_size=3)
    )
    start = draw(st.integers(0, MAX_BLOCKS - 1))
    return ServerRecord(
        peer_id=peer,
        addresses=tuple(str(a) for a in addresses),
        state=draw(st.sampled_from(ServerState)),
        model=draw(model_names),
        start=start,
        end=draw(st.integers(start + 1, MAX_BLOCKS)),
        throughput=draw(rates),
        inference_rps=draw(rates),
        forward_rps=draw(rates),
        free_cache_tokens=draw(st.integers(0, 2**63 - 1)),
        dtype=draw(names),
        quantization=draw(st.none() | names),
        adapters=tuple(draw(st.lists(names, max_size=4))),
        version=draw(names),
    )


model_records = st.builds(
    ModelRecord,
    model=model_names,
    num_blocks=st.integers(1, MAX_BLOCKS),
    config_repo=names,
    config_hash=st.binary(min_size=32, max_size=32),
)


# -- round trips -----------------------------------------------------------------------------


@given(record=server_records())
@settings(max_examples=150)
def test_server_record_round_trip(record: ServerRecord) -> None:
    assert decode_server_record(encode_server_record(record)) == record


@given(record=model_records)
@settings(max_examples=100)
def test_model_record_round_trip(record: ModelRecord) -> None:
    assert decode_model_record(encode_model_record(record)) == record


def test_numbers_are_normalised_to_float() -> None:
    record = server_record(forward_rps=900)
    assert isinstance(record.forward_rps, float) and record.forward_rps == 900.0


# -- malformed input -------------------------------------------------------------------------


@given(data=st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    for decode in (decode_server_record, decode_model_record):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


@given(record=server_records(), position=st.integers(0, 10**6), byte=st.integers(0, 255))
@settings(max_examples=200)
def test_mutated_encodings_decode_or_raise_remote_protocol_error(
    record: ServerRecord, position: int, byte: int
) -> None:
    data = bytearray(encode_server_record(record))
    index = position % len(data)
    for mutated in (
        bytes(data[:index]),  # truncated
        bytes(data[:index] + bytes([byte]) + data[index + 1 :]),  # one byte changed
        bytes(data) + bytes([byte]),  # trailing byte
    ):
        with contextlib.suppress(RemoteProtocolError):
            decode_server_record(mutated)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(
    field=st.sampled_from([f.name for f in dataclasses.fields(ServerRecord)]),
    value=cbor_values,
)
@settings(max_examples=300)
def test_any_field_with_any_value_decodes_or_raises_remote_protocol_error(
    field: str, value: object
) -> None:
    obj = cbor2.loads(encode_server_record(server_record()))
    obj[field] = value
    try:
        decoded = decode_server_record(cbor2.dumps(obj))
    except RemoteProtocolError:
        return
    base = server_record()
    for other in dataclasses.fields(ServerRecord):
        if other.name != field:
            assert getattr(decoded, other.name) == getattr(base, other.name)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "malformed CBOR"),
        (cbor2.dumps([1, 2]), "not a CBOR map with text keys"),
        (cbor2.dumps({1: 2}), "malformed CBOR"),  # only text/bytes keys are hashed
        (cbor2.dumps({b"k": 2}), "not a CBOR map with text keys"),
        (cbor2.dumps({"model": "m"}), "missing fields"),
        (encode_server_record(server_record()) + b"\x00", "trailing bytes"),
        (b"\x00" * 9000, "at most"),
    ],
)
def test_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_server_record(data)


def test_wrong_types_tags_and_rule_breaks_are_remote_errors() -> None:
    base = cbor2.loads(encode_server_record(server_record()))
    for field, value in [
        ("start", True),
        ("start", 1.0),
        ("throughput", "fast"),
        ("throughput", math.nan),
        ("throughput", 10**400),
        ("state", 9),
        ("peer_id", b"short"),
        ("addresses", ["distllm://nobody@host:1"]),
        ("addresses", "not-a-list"),
        ("quantization", 4),
        ("dtype", datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)),  # a CBOR tag
        ("end", 2),
    ]:
        with pytest.raises(RemoteProtocolError):
            decode_server_record(cbor2.dumps({**base, field: value}))


def test_unknown_fields_are_ignored() -> None:
    obj = cbor2.loads(encode_model_record(model_record()))
    assert decode_model_record(cbor2.dumps({**obj, "future": [1, 2]})) == model_record()


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"start": -1}, "start must be an int >= 0, got -1"),
        ({"end": 3}, f"end must be an int in start+1..{MAX_BLOCKS}, got 3"),
        ({"end": MAX_BLOCKS + 1}, f"end must be an int in start+1..{MAX_BLOCKS}, got 4097"),
        ({"throughput": -1.0}, "throughput must be a finite number >= 0, got -1.0"),
        ({"forward_rps": math.inf}, "forward_rps must be a finite number >= 0, got inf"),
        ({"inference_rps": True}, "inference_rps must be a finite number >= 0, got True"),
        (
            {"free_cache_tokens": 2**63},
            f"free_cache_tokens must be an int in 0..2**63-1, got {2**63}",
        ),
        ({"state": 1}, "state must be a ServerState, got 1"),
        ({"peer_id": b"x"}, "peer_id must be a PeerID, got b'x'"),
        ({"addresses": ["a"]}, "addresses must be a tuple of at most 16 items, got ['a']"),
        (
            {"addresses": (f"distllm://{OTHER.peer_id}@h:1",)},
            f"addresses[0] must be a distllm:// address of peer_id, got 'distllm://{OTHER.peer_id}@h:1'",
        ),
        ({"dtype": ""}, "dtype must be a short name, got ''"),
        ({"quantization": "nf 4"}, "quantization must be None or a short name, got 'nf 4'"),
        ({"adapters": ("",)}, "adapters must be a tuple of at most 64 names, got ('',)"),
        ({"version": "x" * 65}, f"version must be a short name, got '{'x' * 65}'"),
        (
            {"model": "models/x"},
            "model must be neither 'models' nor under 'models/', got 'models/x'",
        ),
        (
            {"model": "two words"},
            "model must be a printable str of 1..256 characters without whitespace,"
            " got 'two words'",
        ),
    ],
)
def test_server_record_validation_messages(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        server_record(**changes)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_blocks": 0}, f"num_blocks must be an int in 1..{MAX_BLOCKS}, got 0"),
        ({"config_repo": ""}, "config_repo must be a name, got ''"),
        ({"config_hash": b"\x00"}, "config_hash must be 32 bytes, got b'\\x00'"),
        ({"model": "models"}, "model must be neither 'models' nor under 'models/', got 'models'"),
    ],
)
def test_model_record_validation_messages(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        model_record(**changes)
    assert str(info.value) == message


def test_keys() -> None:
    assert block_keys("m", 2, 5) == ["m/2", "m/3", "m/4"]
    assert block_key("org/m", 0) == "org/m/0" and model_key("org/m") == "models/org/m"
    assert server_record().keys == block_keys("SmolLM2-135M-Instruct", 3, 7)
    assert model_record().key == "models/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="end must be in start"):
        block_keys("m", 5, 5)
    with pytest.raises(ValueError, match=r"block must be in 0\.\.4095"):
        block_key("m", MAX_BLOCKS)
    for bad in ("", "models", "models/a", "a\nb", "x" * 257, 5):
        with pytest.raises(ValueError, match=r"^model must be"):
            validate_model_name(bad)


@given(model=model_names, block=st.integers(0, MAX_BLOCKS - 1), other=model_names)
def test_block_keys_and_model_keys_never_collide(model: str, block: int, other: str) -> None:
    assert block_key(model, block) != model_key(other)


# -- as DHT entries --------------------------------------------------------------------------


def test_server_record_entries_round_trip_through_the_store() -> None:
    record = server_record()
    entries = sign_server_record(SERVER, record, NOW + 60)
    assert [e.key for e in entries] == record.keys
    store = RecordStore()
    for entry in entries:
        assert store.store(entry, NOW)
        assert entry.subkey == peer_subkey(SERVER.peer_id) == record.subkey
    found = store.get("SmolLM2-135M-Instruct/5", NOW)
    assert [decode_server_entry(e) for e in found.values()] == [record]
    with pytest.raises(ValueError, match="cannot be signed by"):
        sign_server_record(OTHER, record, NOW + 60)


def test_server_entry_must_match_its_signer_and_block() -> None:
    record = server_record()
    value = encode_server_record(record)
    # Signed by another peer: the record claims to be SERVER's.
    stolen = sign_entry(OTHER, "SmolLM2-135M-Instruct/3", value, NOW + 60)
    verify_entry(stolen)
    with pytest.raises(RemoteProtocolError, match="under subkey"):
        decode_server_entry(stolen)
    for key in ("SmolLM2-135M-Instruct/7", "SmolLM2-135M-Instruct/03", "other/3", "Smol/x"):
        misplaced = sign_entry(SERVER, key, value, NOW + 60)
        with pytest.raises(RemoteProtocolError, match="under key"):
            decode_server_entry(misplaced)


def test_model_entry() -> None:
    entry = sign_model_record(SERVER, model_record(), NOW + 60)
    assert entry.key == "models/SmolLM2-135M-Instruct"
    assert decode_model_entry(entry) == model_record()
    wrong = sign_entry(SERVER, "models/other", encode_model_record(model_record()), NOW + 60)
    with pytest.raises(RemoteProtocolError, match="under key"):
        decode_model_entry(wrong)
