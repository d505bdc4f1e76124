"""What distllm stores in the DHT: server announcements and model descriptions (pure).

Keys (disjoint: model names may not be ``models`` nor start with ``models/``):

- ``f"{model}/{block}"`` — one :class:`ServerRecord` per server hosting that block, under the
  server's own subkey (:func:`~distllm.dht.records.peer_subkey`);
- ``f"models/{model}"`` — a :class:`ModelRecord`, under the subkey of each server that
  publishes it (readers compare the copies).

Values are CBOR maps with text keys, one per field. Decoding is strict about the fields it
knows (all present, exact types) and ignores the others, so a newer peer can add fields.
Invalid construction raises ``ValueError`` naming the field, the rule and the value; malformed
bytes from a peer raise :class:`~distllm.errors.RemoteProtocolError` only.
"""

from __future__ import annotations

import enum
import io
import math
from dataclasses import dataclass, fields
from typing import TypeVar

import cbor2

from distllm.dht.records import SignedEntry, peer_subkey, sign_entry
from distllm.errors import RemoteProtocolError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID

__all__ = [
    "MAX_BLOCKS",
    "MAX_RECORD_BYTES",
    "ModelRecord",
    "ServerRecord",
    "ServerState",
    "block_key",
    "block_keys",
    "decode_model_entry",
    "decode_model_record",
    "decode_server_entry",
    "decode_server_record",
    "encode_model_record",
    "encode_server_record",
    "model_key",
    "sign_model_record",
    "sign_server_record",
    "validate_model_name",
]

#: Largest encoded record accepted (well under the record store's value limit).
MAX_RECORD_BYTES = 8 * 1024
#: Most blocks a model may have (today's largest have a few hundred).
MAX_BLOCKS = 4096
_MAX_NAME = 256
_MAX_SHORT = 64
_MAX_ADDRESSES = 16
_MAX_ADAPTERS = 64
_MAX_INT = (1 << 63) - 1
_MODELS_PREFIX = "models/"


class ServerState(enum.Enum):
    JOINING = 0  # loading weights; not yet serving
    ONLINE = 1
    OFFLINE = 2  # leaving: clients stop routing new sessions to it


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: object, max_len: int) -> bool:
    """A non-empty printable string without whitespace, at most ``max_len`` characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_len
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def _check_rate(field: str, value: object) -> float:
    number = _as_float(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
    return number


def _as_float(value: object) -> float | None:
    """An int or float as a float (huge ints become inf); None for anything else (bool too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def validate_model_name(model: object) -> str:
    """Return ``model`` if it is a valid model name, else raise ``ValueError``."""
    if not isinstance(model, str) or not _is_name(model, _MAX_NAME):
        raise ValueError(
            f"model must be a printable str of 1..{_MAX_NAME} characters without whitespace,"
            f" got {model!r}"
        )
    _require(
        model != "models" and not model.startswith(_MODELS_PREFIX),
        "model",
        "neither 'models' nor under 'models/'",
        model,
    )
    return model


def block_key(model: str, block: int) -> str:
    validate_model_name(model)
    _require(_is_int(block) and 0 <= block < MAX_BLOCKS, "block", f"in 0..{MAX_BLOCKS - 1}", block)
    return f"{model}/{block}"


def block_keys(model: str, start: int, end: int) -> list[str]:
    """The keys of blocks ``start..end-1`` of ``model``."""
    _require(_is_int(start) and start >= 0, "start", "an int >= 0", start)
    _require(_is_int(end) and start < end <= MAX_BLOCKS, "end", f"in start+1..{MAX_BLOCKS}", end)
    return [block_key(model, block) for block in range(start, end)]


def model_key(model: str) -> str:
    return _MODELS_PREFIX + validate_model_name(model)


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """A server's announcement: who it is, where, which blocks, and how much it can take."""

    peer_id: PeerID
    addresses: tuple[str, ...]  # distllm:// addresses of peer_id; 0..16 (0: not dialable)
    state: ServerState
    model: str  # validate_model_name
    start: int  # first block served; 0 <= start < end <= MAX_BLOCKS
    end: int  # one past the last block served
    throughput: float  # announced capacity (placement and routing compare it); finite >= 0
    inference_rps: float  # measured per block; finite >= 0
    forward_rps: float  # measured per block; finite >= 0
    free_cache_tokens: int  # KV cache tokens still free; 0..2**63-1
    dtype: str  # e.g. "float16"; a short name
    quantization: str | None  # e.g. "nf4"; None: none
    adapters: tuple[str, ...]  # names of loaded adapters; at most 64
    version: str  # distllm version of the server; a short name

    def __post_init__(self) -> None:
        _require(isinstance(self.peer_id, PeerID), "peer_id", "a PeerID", self.peer_id)
        _require(
            isinstance(self.addresses, tuple) and len(self.addresses) <= _MAX_ADDRESSES,
            "addresses",
            f"a tuple of at most {_MAX_ADDRESSES} items",
            self.addresses,
        )
        for i, text in enumerate(self.addresses):
            _require(
                _address_of(text) == self.peer_id,
                f"addresses[{i}]",
                "a distllm:// address of peer_id",
                text,
            )
        _require(isinstance(self.state, ServerState), "state", "a ServerState", self.state)
        validate_model_name(self.model)
        _require(_is_int(self.start) and self.start >= 0, "start", "an int >= 0", self.start)
        _require(
            _is_int(self.end) and self.start < self.end <= MAX_BLOCKS,
            "end",
            f"an int in start+1..{MAX_BLOCKS}",
            self.end,
        )
        for name in ("throughput", "inference_rps", "forward_rps"):
            object.__setattr__(self, name, _check_rate(name, getattr(self, name)))
        _require(
            _is_int(self.free_cache_tokens) and 0 <= self.free_cache_tokens <= _MAX_INT,
            "free_cache_tokens",
            "an int in 0..2**63-1",
            self.free_cache_tokens,
        )
        _require(_is_name(self.dtype, _MAX_SHORT), "dtype", "a short name", self.dtype)
        _require(
            self.quantization is None or _is_name(self.quantization, _MAX_SHORT),
            "quantization",
            "None or a short name",
            self.quantization,
        )
        _require(
            isinstance(self.adapters, tuple)
            and len(self.adapters) <= _MAX_ADAPTERS
            and all(_is_name(a, _MAX_NAME) for a in self.adapters),
            "adapters",
            f"a tuple of at most {_MAX_ADAPTERS} names",
            self.adapters,
        )
        _require(_is_name(self.version, _MAX_SHORT), "version", "a short name", self.version)

    @property
    def subkey(self) -> str:
        return peer_subkey(self.peer_id)

    @property
    def keys(self) -> list[str]:
        """The block keys this record is stored under."""
        return block_keys(self.model, self.start, self.end)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """What a client needs to find and check a model's configuration."""

    model: str  # validate_model_name
    num_blocks: int  # 1..MAX_BLOCKS
    config_repo: str  # where the config comes from (repository or name); a printable name
    config_hash: bytes  # SHA-256 of the config file, 32 bytes

    def __post_init__(self) -> None:
        validate_model_name(self.model)
        _require(
            _is_int(self.num_blocks) and 1 <= self.num_blocks <= MAX_BLOCKS,
            "num_blocks",
            f"an int in 1..{MAX_BLOCKS}",
            self.num_blocks,
        )
        _require(_is_name(self.config_repo, _MAX_NAME), "config_repo", "a name", self.config_repo)
        _require(
            isinstance(self.config_hash, bytes) and len(self.config_hash) == 32,
            "config_hash",
            "32 bytes",
            self.config_hash,
        )

    @property
    def key(self) -> str:
        return model_key(self.model)


def _address_of(text: object) -> PeerID | None:
    if not isinstance(text, str):
        return None
    try:
        return PeerAddress.parse(text).peer_id
    except ValueError:
        return None


# -- encoding --------------------------------------------------------------------------------


def encode_server_record(record: ServerRecord) -> bytes:
    return _dumps(
        {
            "peer_id": record.peer_id.digest,
            "addresses": list(record.addresses),
            "state": record.state.value,
            "model": record.model,
            "start": record.start,
            "end": record.end,
            "throughput": record.throughput,
            "inference_rps": record.inference_rps,
            "forward_rps": record.forward_rps,
            "free_cache_tokens": record.free_cache_tokens,
            "dtype": record.dtype,
            "quantization": record.quantization,
            "adapters": list(record.adapters),
            "version": record.version,
        }
    )


def decode_server_record(data: bytes) -> ServerRecord:
    """Parse a peer's bytes; raises ``RemoteProtocolError`` (only) if they are not a record."""
    obj = _loads_map(data, ServerRecord)
    try:
        return ServerRecord(
            peer_id=PeerID(_get(obj, "peer_id", bytes)),
            addresses=_get_strs(obj, "addresses"),
            state=ServerState(_get(obj, "state", int)),
            model=_get(obj, "model", str),
            start=_get(obj, "start", int),
            end=_get(obj, "end", int),
            throughput=_get_number(obj, "throughput"),
            inference_rps=_get_number(obj, "inference_rps"),
            forward_rps=_get_number(obj, "forward_rps"),
            free_cache_tokens=_get(obj, "free_cache_tokens", int),
            dtype=_get(obj, "dtype", str),
            quantization=None if obj["quantization"] is None else _get(obj, "quantization", str),
            adapters=_get_strs(obj, "adapters"),
            version=_get(obj, "version", str),
        )
    except ValueError as exc:  # a field's value broke a rule of the record
        raise RemoteProtocolError(f"ServerRecord: {exc}") from exc


def encode_model_record(record: ModelRecord) -> bytes:
    return _dumps(
        {
            "model": record.model,
            "num_blocks": record.num_blocks,
            "config_repo": record.config_repo,
            "config_hash": record.config_hash,
        }
    )


def decode_model_record(data: bytes) -> ModelRecord:
    """Parse a peer's bytes; raises ``RemoteProtocolError`` (only) if they are not a record."""
    obj = _loads_map(data, ModelRecord)
    try:
        return ModelRecord(
            model=_get(obj, "model", str),
            num_blocks=_get(obj, "num_blocks", int),
            config_repo=_get(obj, "config_repo", str),
            config_hash=_get(obj, "config_hash", bytes),
        )
    except ValueError as exc:
        raise RemoteProtocolError(f"ModelRecord: {exc}") from exc


# -- records as DHT entries ------------------------------------------------------------------


def sign_server_record(
    identity: Identity, record: ServerRecord, expiration: float
) -> list[SignedEntry]:
    """One signed entry per block key of ``record`` (the announcement of every block)."""
    if identity.peer_id != record.peer_id:
        raise ValueError(f"record of {record.peer_id!r} cannot be signed by {identity!r}")
    value = encode_server_record(record)
    return [sign_entry(identity, key, value, expiration) for key in record.keys]


def sign_model_record(identity: Identity, record: ModelRecord, expiration: float) -> SignedEntry:
    return sign_entry(identity, record.key, encode_model_record(record), expiration)


def decode_server_entry(entry: SignedEntry) -> ServerRecord:
    """The record in a verified entry (see ``verify_entry``), checked against where it was
    found: it must be its signer's own record and cover the block of the entry's key."""
    record = decode_server_record(entry.value)
    if entry.subkey != record.subkey:
        raise RemoteProtocolError(f"record of {record.peer_id!r} under subkey {entry.subkey!r}")
    prefix, _, block = entry.key.rpartition("/")
    if not (
        prefix == record.model
        and 0 < len(block) <= 4
        and block.isascii()
        and block.isdigit()
        and str(int(block)) == block  # one spelling: no leading zeros
        and record.start <= int(block) < record.end
    ):
        raise RemoteProtocolError(
            f"record for blocks {record.start}..{record.end - 1} under key {entry.key!r}"
        )
    return record


def decode_model_entry(entry: SignedEntry) -> ModelRecord:
    """The record in a verified entry, checked to sit under its own model's key."""
    record = decode_model_record(entry.value)
    if entry.key != record.key:
        raise RemoteProtocolError(f"model record of {record.model!r} under key {entry.key!r}")
    return record


# -- strict CBOR helpers ---------------------------------------------------------------------

_T = TypeVar("_T")


def _dumps(obj: dict[str, object]) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _loads_map(data: bytes, cls: type) -> dict[str, object]:
    what = cls.__name__
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise RemoteProtocolError(f"{what}: not bytes of at most {MAX_RECORD_BYTES}")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            read_size=1,  # so that stream.tell() is exactly where the item ended
            max_depth=4,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        obj = decoder.decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise RemoteProtocolError(f"{what}: malformed CBOR ({exc})") from exc
    if stream.tell() != len(data):
        raise RemoteProtocolError(f"{what}: trailing bytes after the CBOR item")
    if not isinstance(obj, dict) or not all(isinstance(key, str) for key in obj):
        raise RemoteProtocolError(f"{what}: not a CBOR map with text keys")
    missing = {f.name for f in fields(cls)} - obj.keys()
    if missing:
        raise RemoteProtocolError(f"{what}: missing fields {sorted(missing)}")
    return obj


def _get(obj: dict[str, object], name: str, kind: type[_T]) -> _T:
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteProtocolError(f"field {name!r} is not {kind.__name__}: {value!r:.80}")
    return value


def _get_number(obj: dict[str, object], name: str) -> float:
    value = _as_float(obj[name])
    if value is None:
        raise RemoteProtocolError(f"field {name!r} is not a number: {obj[name]!r:.80}")
    return value


def _get_strs(obj: dict[str, object], name: str) -> tuple[str, ...]:
    value = _get(obj, name, list)
    if not all(isinstance(item, str) for item in value):
        raise RemoteProtocolError(f"field {name!r} is not an array of text")
    return tuple(value)
