"""Messages: schema-driven round trips, strict validation, and hostile input."""

from __future__ import annotations

import dataclasses
import enum
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distllm.config import WireLimits
from distllm.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from distllm.ids import PeerID
from distllm.wire import framing
from distllm.wire.messages import (
    MAX_NESTING_DEPTH,
    PAYLOAD_ALIGNMENT,
    PROTOCOL_VERSION,
    decode_message,
    encode_message,
    message,
    registered_types,
)
from distllm.wire.tensors import DTYPES, WireTensor, codecs_for, storage_dtype

# --- test-only message types covering every field kind ----------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@message("test.wire.inner")
@dataclass(frozen=True, slots=True)
class Inner:
    name: str
    weight: float
    blob: bytes


@message("test.wire.everything")
@dataclass(frozen=True, slots=True)
class Everything:
    flag: bool
    count: int
    ratio: float
    label: str
    raw: bytes
    nothing: None
    maybe: int | None
    numbers: tuple[int, ...]
    pair: tuple[str, float]
    table: dict[str, int]
    tensor: WireTensor
    tensors: tuple[WireTensor, ...]
    named: dict[str, WireTensor]
    optional_tensor: WireTensor | None
    inner: Inner
    inners: tuple[Inner, ...]
    maybe_inner: Inner | None
    color: Color
    level: Level
    mode: Literal["greedy", "sample", 3]
    peer: PeerID
    extra: Any


@message("test.wire.tree")
@dataclass(frozen=True, slots=True)
class Tree:
    """Recursive: its own name is unresolved while it is being registered."""

    value: int
    children: tuple[Tree, ...]


@message("test.wire.span")
@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad span {self.start}..{self.end}")


@message("test.wire.empty")
@dataclass(frozen=True, slots=True)
class Empty:
    pass


@message("test.wire.step")
@dataclass(frozen=True, slots=True)
class Step:
    """Shaped like an inference step: a few scalars and one hidden-state tensor."""

    session: int
    hidden: WireTensor


@message("test.wire.twin")
@dataclass(frozen=True, slots=True)
class Twin:
    a: WireTensor
    b: WireTensor


TEST_TYPES = (Inner, Everything, Tree, Span, Empty, Step, Twin)

# --- strategies derived from type hints, so every registered type can be generated -------------

SMALL_FLOATS = st.floats(allow_nan=False, min_value=-1e4, max_value=1e4, width=32)
INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def wire_tensors(draw: st.DrawFn) -> WireTensor:
    dtype = draw(st.sampled_from(DTYPES))
    codec = draw(st.sampled_from(codecs_for(dtype)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    if dtype in ("float32", "float16", "bfloat16"):
        values = draw(hnp.arrays(np.float32, shape, elements=SMALL_FLOATS))
    else:
        values = draw(hnp.arrays(storage_dtype(dtype), shape))
    return WireTensor.from_numpy(values, codec, dtype=dtype)


PLAIN = st.recursive(
    st.none() | st.booleans() | INT64 | SMALL_FLOATS | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def strategy_for(hint: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    simple = {
        bool: st.booleans(),
        int: st.integers(-2, 50) | INT64,
        float: st.floats(allow_nan=False),
        str: st.text(max_size=10),
        bytes: st.binary(max_size=10),
        type(None): st.none(),
        WireTensor: wire_tensors(),
        PeerID: st.binary(min_size=32, max_size=32).map(PeerID),
        Any: PLAIN,
    }
    if hint in simple:
        return simple[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(arg, depth) for arg in args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if depth >= 3:  # keeps recursive types finite
            return st.just(())
        return st.lists(strategy_for(args[0], depth + 1), max_size=3).map(tuple)
    if origin is tuple:
        return st.tuples(*(strategy_for(arg, depth + 1) for arg in args))
    if origin is dict:
        return st.dictionaries(st.text(max_size=5), strategy_for(args[1], depth + 1), max_size=3)
    if origin is Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return st.sampled_from(args or list(hint))
    return messages_of(hint, depth + 1)


def messages_of(cls: type, depth: int = 0) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name], depth) for f in dataclasses.fields(cls)}

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        try:
            return cls(**{name: draw(strategy) for name, strategy in fields.items()})
        except (ValueError, TypeError):
            assume(False)  # rejected by the type's own validators

    return build()


def encode(msg: object, limits: WireLimits | None = None) -> bytes:
    return b"".join(encode_message(msg, limits or WireLimits()))


def body(header: Any, payload: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    """Hand-made message body, for malformed cases."""
    encoded = cbor2.dumps(header) if raw_header is None else raw_header
    return struct.pack(">I", len(encoded)) + encoded + payload


def header(type_name: str, fields: Any, tensors: Any = (), version: Any = PROTOCOL_VERSION) -> Any:
    return {"version": version, "type": type_name, "fields": fields, "tensors": list(tensors)}


def make_everything(**changes: Any) -> Everything:
    tensor = WireTensor.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    base = Everything(
        flag=True,
        count=-7,
        ratio=0.25,
        label="hello",
        raw=b"\x00\xff",
        nothing=None,
        maybe=None,
        numbers=(1, 2, 3),
        pair=("a", 1.5),
        table={"x": 1},
        tensor=tensor,
        tensors=(WireTensor.from_numpy(np.ones(3, np.int64)),),
        named={"mask": WireTensor.from_numpy(np.array([True, False]))},
        optional_tensor=None,
        inner=Inner("in", 2.0, b"b"),
        inners=(),
        maybe_inner=None,
        color=Color.GREEN,
        level=Level.HIGH,
        mode="sample",
        peer=PeerID(bytes(range(32))),
        extra={"k": [1, "two", None]},
    )
    return dataclasses.replace(base, **changes)


def assert_remote_error(data: bytes, match: str | None = None, **limits: int) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(data, WireLimits(**limits))


# --- round trips -------------------------------------------------------------------------------


def test_test_types_are_registered_under_their_names() -> None:
    registry = registered_types()
    for cls in TEST_TYPES:
        assert any(registry[name] is cls for name in registry)
    assert registry["test.wire.tree"] is Tree
    with pytest.raises(TypeError):
        registry["x"] = Tree  # type: ignore[index]


@pytest.mark.parametrize("cls", TEST_TYPES, ids=lambda cls: cls.__name__)
@settings(
    max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(data=st.data())
def test_every_type_roundtrips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(messages_of(cls))
    assert decode_message(encode(msg)) == msg


def test_fixed_example_roundtrips_with_exact_types() -> None:
    msg = make_everything(maybe=5, optional_tensor=WireTensor.from_numpy(np.zeros(0, np.uint8)))
    decoded = decode_message(encode(msg))
    assert decoded == msg
    assert isinstance(decoded, Everything)
    assert type(decoded.numbers) is tuple and type(decoded.pair) is tuple
    assert decoded.color is Color.GREEN and decoded.level is Level.HIGH


def test_nan_float_fields_travel() -> None:
    decoded = decode_message(encode(make_everything(ratio=float("nan"))))
    assert isinstance(decoded, Everything) and decoded.ratio != decoded.ratio


def test_decoded_tensors_are_aligned_views_of_the_body() -> None:
    msg = make_everything()
    data = bytearray(encode(msg))
    decoded = decode_message(data)
    assert isinstance(decoded, Everything)
    frame = np.frombuffer(data, np.uint8)
    for tensor in (decoded.tensor, decoded.tensors[0], decoded.named["mask"]):
        assert isinstance(tensor.data, memoryview)
        assert np.shares_memory(tensor.to_numpy(), frame)
        offset = np.frombuffer(tensor.data, np.uint8).ctypes.data - frame.ctypes.data
        assert offset % PAYLOAD_ALIGNMENT == 0


def test_encoding_is_deterministic_and_coalesces_small_payloads() -> None:
    msg = make_everything()
    assert encode(msg) == encode(make_everything())
    assert len(encode_message(msg)) == 1
    big = WireTensor.from_numpy(np.zeros(100_000, np.float32))
    parts = encode_message(Step(1, big))
    assert len(parts) == 2 and parts[1] is big.data


def test_int_enum_and_str_subclass_values_are_sent_plain() -> None:
    decoded = decode_message(encode(Span(Level.LOW, 5)))
    assert isinstance(decoded, Span) and decoded == Span(1, 5)
    assert type(decoded.start) is int
    inner = decode_message(encode(Inner(Color.RED.value, 1, b"")))
    assert inner == Inner("red", 1.0, b"")


def test_recursion_up_to_the_nesting_limit() -> None:
    # Header map (1) > fields map (2) > children array (3) > child map (4) > its children...
    tree = Tree(0, ())
    for level in range((MAX_NESTING_DEPTH - 3) // 2):
        tree = Tree(level, (tree,))
    assert decode_message(encode(tree)) == tree
    with pytest.raises(LimitExceeded, match="nested deeper"):
        encode_message(Tree(-1, (tree,)))


# --- encoding errors are ours ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"count": True}, "count"),
        ({"count": 2**63}, "count"),
        ({"ratio": "1"}, "ratio"),
        ({"flag": 1}, "flag"),
        ({"numbers": [1, 2]}, "numbers"),
        ({"numbers": (1, "2")}, r"numbers\[1\]"),
        ({"pair": ("a",)}, "pair"),
        ({"table": {1: 1}}, "table"),
        ({"tensor": np.zeros(2)}, "tensor"),
        ({"inner": Span(1, 2)}, "inner"),
        ({"color": "red"}, "color"),
        ({"mode": "beam"}, "mode"),
        ({"mode": True}, "mode"),
        ({"peer": b"x" * 32}, "peer"),
        ({"extra": {1, 2}}, "extra"),
        ({"label": "\ud800"}, None),
    ],
)
def test_encoding_a_wrong_value_is_a_local_error(changes: dict[str, Any], where: str) -> None:
    msg = make_everything(**changes)
    with pytest.raises(LocalProtocolError, match=where and f"test.wire.everything.{where}"):
        encode_message(msg)


def test_encoding_an_unregistered_object_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="not a registered"):
        encode_message(object())


@pytest.mark.parametrize(
    ("msg", "limits", "match"),
    [
        (
            Step(1, WireTensor.from_numpy(np.zeros(300, np.float32))),
            {"max_tensor_bytes": 1000},
            "max_tensor_bytes",
        ),
        (Step(1, WireTensor.from_numpy(np.zeros((1,) * 9, np.float32))), {}, "max_tensor_dims"),
        (make_everything(), {"max_tensors_per_message": 2}, "max_tensors_per_message"),
        (make_everything(label="x" * 2000), {"max_header_bytes": 1024}, "max_header_bytes"),
        (
            Step(1, WireTensor.from_numpy(np.zeros(300, np.float32))),
            {"max_frame_bytes": 1024, "max_header_bytes": 1024},
            "max_frame_bytes",
        ),
    ],
)
def test_encoding_beyond_our_limits(msg: object, limits: dict[str, int], match: str) -> None:
    with pytest.raises(LimitExceeded, match=match):
        encode_message(msg, WireLimits(**limits))


def test_compressed_tensor_limit_counts_the_decoded_size() -> None:
    tensor = WireTensor.from_numpy(np.zeros(1000, np.float32), "int8_blockwise")
    assert len(tensor.data) < 1100 < tensor.nbytes
    with pytest.raises(LimitExceeded):
        encode_message(Step(1, tensor), WireLimits(max_tensor_bytes=1100))


# --- registration ------------------------------------------------------------------------------


def test_registration_rules() -> None:
    with pytest.raises(ValueError, match="already registered"):
        message("test.wire.span")(dataclass(frozen=True)(type("Other", (), {})))
    with pytest.raises(ValueError, match="invalid message type name"):
        message("9lives")
    with pytest.raises(TypeError, match="frozen"):
        message("test.wire.mutable")(dataclass(type("Mutable", (), {})))
    with pytest.raises(TypeError, match="dataclass"):
        message("test.wire.plain")(type("Plain", (), {}))
    assert "test.wire.mutable" not in registered_types()


@pytest.mark.parametrize(
    "hint",
    [list[int], int | str, dict[int, int], set[int], tuple, Literal[1.5], np.ndarray, complex],
    ids=str,
)
def test_unsupported_field_types_are_refused_at_registration(hint: Any) -> None:
    cls: type = dataclass(frozen=True)(type("Bad", (), {"__annotations__": {"x": hint}}))
    with pytest.raises(TypeError, match=r"Bad\.x"):
        message("test.wire.bad")(cls)
    assert "test.wire.bad" not in registered_types()  # a failed registration leaves no trace


def test_unregistered_nested_dataclass_is_refused() -> None:
    loose: type = dataclass(frozen=True)(type("Loose", (), {"__annotations__": {"x": int}}))
    cls: type = dataclass(frozen=True)(type("Holder", (), {"__annotations__": {"x": loose}}))
    with pytest.raises(TypeError, match="not a registered message type"):
        message("test.wire.holder")(cls)


# --- malformed input: one explicit case each ---------------------------------------------------

GOOD_SPAN = {"start": 1, "end": 2}
STEP_TENSOR = ["float32", [2], "none", 8]


def step_body(descriptor: Any, payload: bytes, fields: Any = None) -> bytes:
    fields = {"session": 1, "hidden": 0} if fields is None else fields
    head = cbor2.dumps(header("test.wire.step", fields, [descriptor]))
    prefix = struct.pack(">I", len(head)) + head
    return prefix + bytes(-len(prefix) % PAYLOAD_ALIGNMENT) + payload


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"\x00\x00\x00", "too short"),
        (struct.pack(">I", 10) + b"\xa0", "runs past"),
        (body(header("test.wire.nope", {})), "unknown message type"),
        (body(header("test.wire.span", GOOD_SPAN, version=2)), "version"),
        (body(header("test.wire.span", GOOD_SPAN, version=True)), "version"),
        (body({**header("test.wire.span", GOOD_SPAN), "more": 1}), "header keys"),
        (body([1, 2]), "header map"),
        (body(header("test.wire.span", {"start": 1})), r"missing fields \['end'\]"),
        (body(header("test.wire.span", {**GOOD_SPAN, "x": 0})), "unknown fields"),
        (body(header("test.wire.span", {"start": True, "end": 2})), "start: expected int"),
        (body(header("test.wire.span", {"start": 1.0, "end": 2})), "start: expected int"),
        (body(header("test.wire.span", {"start": 2**63, "end": 2**64 - 1})), "64-bit"),
        (body(header("test.wire.span", {"start": 3, "end": 2})), "bad span"),
        (body(header("test.wire.span", [1, 2])), "a map of Span fields"),
        (body(header("test.wire.inner", {"name": "a", "weight": 1, "blob": b""})), "float"),
        (
            body(
                header("test.wire.tree", {"value": 1, "children": [{"value": "x", "children": []}]})
            ),
            r"children\[0\]\.value",
        ),
        (
            body(
                header("test.wire.empty", {}),
                raw_header=cbor2.dumps(header("test.wire.empty", {})) + b"\x00",
            ),
            "follow the CBOR header",
        ),
        (body(None, raw_header=b"\xa1\x61a"), "malformed CBOR"),
        (body(None, raw_header=b"\xc2\x41\x01"), "malformed CBOR"),
        (body(None, raw_header=b"\xd9\xd9\xf7\xa0"), "malformed CBOR"),
        (body(None, raw_header=b"\xbf\xff"), "malformed CBOR"),
        (body(None, raw_header=b"\xa2\x61a\x01\x61a\x02"), "malformed CBOR"),
        (body(None, raw_header=b"\x81" * 40 + b"\x01"), "malformed CBOR"),
        (body(None, raw_header=b"\x62\xff\xfe"), "malformed CBOR"),
        (body(None, raw_header=b"\xf7"), "header map"),
        (step_body(STEP_TENSOR, bytes(8)) + b"\x00", "parts end at byte"),
        (step_body(STEP_TENSOR, bytes(7)), "runs past the end"),
        (step_body(["float32", [2], "none", 9], bytes(9)), "says 9 payload bytes"),
        (step_body(["float32", [-2], "none", 8], bytes(8)), "dimensions"),
        (step_body(["float32", [2.0], "none", 8], bytes(8)), "dimensions"),
        (step_body(["float32", [1] * 9, "none", 4], bytes(4)), "max_tensor_dims"),
        (step_body(["float64", [2], "none", 16], bytes(16)), "dtype"),
        (step_body(["int64", [2], "float16", 4], bytes(4)), "compression"),
        (step_body(["float32", [2], "none"], bytes(8)), "descriptor|nbytes"),
        (step_body(["bool", [2], "none", 2], b"\x01\x02"), "bool payload"),
        (step_body(STEP_TENSOR, bytes(8), {"session": 1, "hidden": 1}), "tensor index"),
        (step_body(STEP_TENSOR, bytes(8), {"session": 1, "hidden": None}), "tensor index"),
        (step_body(["float32", [2**32 - 1] * 2, "none", 0], b""), "max_tensor_bytes"),
    ],
)
def test_malformed_input_is_a_remote_error(data: bytes, match: str) -> None:
    assert_remote_error(data, match)


def test_oversized_header_is_refused_before_parsing() -> None:
    huge = struct.pack(">I", 2 * 1024 * 1024) + b"\xa0"
    assert_remote_error(huge, "max_header_bytes")
    fine = encode(make_everything(label="x" * 3000))
    assert_remote_error(fine, "max_header_bytes", max_header_bytes=2048)


def test_tensor_over_the_byte_limit_is_a_remote_error() -> None:
    data = encode(Step(1, WireTensor.from_numpy(np.zeros(512, np.float32))))
    decode_message(data)  # fine with the default limits
    assert_remote_error(data, "max_tensor_bytes", max_tensor_bytes=2047)


def test_too_many_tensors_and_oversized_body_are_remote_errors() -> None:
    data = encode(make_everything())
    assert_remote_error(data, "max_tensors_per_message", max_tensors_per_message=2)
    padded = encode(make_everything(raw=bytes(2000)))
    assert_remote_error(padded, "max_frame_bytes", max_frame_bytes=1024, max_header_bytes=1024)


def test_non_zero_padding_is_refused() -> None:
    data = bytearray(step_body(STEP_TENSOR, bytes(8)))
    data[-9] = 1
    assert_remote_error(bytes(data), "padding")


def twin_body(fields: dict[str, Any], count: int) -> bytes:
    head = cbor2.dumps(header("test.wire.twin", fields, [STEP_TENSOR] * count))
    out = struct.pack(">I", len(head)) + head
    for _ in range(count):
        out += bytes(-len(out) % PAYLOAD_ALIGNMENT) + bytes(8)
    return out


def test_each_tensor_is_referenced_exactly_once() -> None:
    assert decode_message(twin_body({"a": 0, "b": 1}, 2)) is not None
    assert_remote_error(twin_body({"a": 0, "b": 0}, 2), "more than once")
    assert_remote_error(twin_body({"a": 0, "b": 1}, 3), r"tensors \[2\] are not referenced")
    assert_remote_error(twin_body({"a": 0, "b": 2}, 2), "tensor index")


def test_validator_errors_of_nested_messages_are_remote_errors() -> None:
    fields = {"value": 1, "children": [{"value": 2, "children": "no"}]}
    assert_remote_error(body(header("test.wire.tree", fields)), r"children\[0\]\.children")


# --- hostile input: only RemoteProtocolError, whatever the bytes ------------------------------


def decode_or_remote_error(data: bytes | bytearray) -> None:
    try:
        result = decode_message(data)
    except RemoteProtocolError:
        return
    assert type(result) in registered_types().values()


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_give_only_remote_errors(data: bytes) -> None:
    decode_or_remote_error(data)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_headers_in_a_valid_envelope(raw_header: bytes) -> None:
    decode_or_remote_error(body(None, raw_header=raw_header))


CBOR_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.sampled_from((*DTYPES, "none", "int8_blockwise", "test.wire.everything", "test.wire.tree"))
)
CBOR_VALUES = st.recursive(
    CBOR_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["start", "end", "value"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    type_name=st.sampled_from(
        sorted(name for name in registered_types() if name.startswith("test."))
    ),
    fields=CBOR_VALUES,
    tensors=st.lists(
        st.lists(CBOR_SCALARS | st.lists(st.integers(-2, 70), max_size=3), max_size=5), max_size=3
    ),
    payload=st.binary(max_size=300),
)
def test_structured_garbage_gives_only_remote_errors(
    type_name: str, fields: Any, tensors: Any, payload: bytes
) -> None:
    decode_or_remote_error(body(header(type_name, fields, tensors), payload))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_messages_give_only_remote_errors(data: st.DataObject) -> None:
    msg = data.draw(messages_of(Everything))
    encoded = bytearray(encode(msg))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mutation == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, len(encoded) - 1))
            encoded[index] ^= data.draw(st.integers(1, 255))
    elif mutation == "truncate":
        del encoded[data.draw(st.integers(0, len(encoded) - 1)) :]
    elif mutation == "extend":
        encoded += data.draw(st.binary(min_size=1, max_size=80))
    else:
        index = data.draw(st.integers(0, len(encoded)))
        encoded[index:index] = data.draw(st.binary(min_size=1, max_size=8))
    decode_or_remote_error(encoded)


# --- the 64 MiB path ---------------------------------------------------------------------------


def test_64_mib_tensor_is_copied_once_into_the_frame_buffer() -> None:
    values = np.arange(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    msg = Step(7, WireTensor.from_numpy(values))
    parts = framing.encode_frame(encode_message(msg), WireLimits().max_frame_bytes)
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), values) for p in parts)  # no copy

    decoder = framing.FrameDecoder(WireLimits().max_frame_bytes)
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), 1 << 20):  # the transport delivers 1 MiB chunks
            decoder.feed(view[start : start + (1 << 20)])
    frame = decoder.next_frame()
    assert frame is not None and decoder.at_boundary()

    decoded = decode_message(frame)
    assert isinstance(decoded, Step) and decoded.session == 7
    array = decoded.hidden.to_numpy()
    assert np.shares_memory(array, np.frombuffer(frame, np.uint8))
    assert np.array_equal(array, values)
