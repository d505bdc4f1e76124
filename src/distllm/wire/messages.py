"""Messages: registered frozen dataclasses, encoded as a CBOR header plus raw tensor payloads.

Body of a message (``docs/protocol.md`` §3)::

    u32 header_len (big-endian) | CBOR header (header_len bytes) | tensor payloads

The header is ``{"version": 1, "type": name, "fields": {...}, "tensors": [descriptor, ...]}``
with one ``[dtype, shape, compression, nbytes]`` descriptor per tensor. A tensor-valued field holds
its descriptor's index. Each payload starts at the next multiple of :data:`PAYLOAD_ALIGNMENT`
from the start of the body (zero bytes pad the gaps), so zero-copy views of it are aligned.

Field types are read from the dataclass's type hints when it is registered; values are checked
against them when encoding (``LocalProtocolError``: our bug) and decoding
(``RemoteProtocolError``: the peer's fault, the only error :func:`decode_message` raises for bad
input).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import re
import struct
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar

import cbor2
import numpy as np

from distllm.config import WireLimits
from distllm.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from distllm.ids import PeerID
from distllm.wire.tensors import (
    DTYPES,
    MAX_DIM_SIZE,
    WireTensor,
    codecs_for,
    payload_nbytes,
)

__all__ = [
    "HEADER_LENGTH",
    "MAX_NESTING_DEPTH",
    "PAYLOAD_ALIGNMENT",
    "PROTOCOL_VERSION",
    "decode_message",
    "encode_message",
    "message",
    "registered_types",
]

T = TypeVar("T")

PROTOCOL_VERSION: Final = 1
#: Every tensor payload starts at a multiple of this many bytes from the start of the body.
PAYLOAD_ALIGNMENT: Final = 64
#: Deepest CBOR container nesting in a header (the header map itself is level 1).
MAX_NESTING_DEPTH: Final = 32
HEADER_LENGTH: Final = struct.Struct(">I")

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_TYPE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")
_HEADER_KEYS: Final = frozenset({"version", "type", "fields", "tensors"})
_FIELDS_LEVEL: Final = 2  # header map (1) > fields map (2)
_COALESCE_BYTES: Final = 16 * 1024  # smaller payloads are copied next to the header
_DEFAULT_LIMITS: Final = WireLimits()


# ---------------------------------------------------------------------------------------------
# Validation errors, raised inside this module and turned into the public errors at its edge.


class _Invalid(Exception):
    """A value does not fit its schema. ``path`` is filled innermost first while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def describe(self) -> str:
        where = "".join(reversed(self.path))
        return f"{where}: {self.reason}" if where else self.reason


class _TooDeep(_Invalid):
    """A value nests deeper than :data:`MAX_NESTING_DEPTH` (only raised when encoding)."""


def _show(value: object) -> str:
    """A short description of a (possibly huge, attacker-chosen) value for error messages."""
    text = repr(value[:60] if isinstance(value, str | bytes) else value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _mismatch(expected: str, value: object) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_show(value)}")


def _enter(level: int) -> int:
    """The level of a container opened at ``level``; too deep is a local limit when encoding."""
    if level >= MAX_NESTING_DEPTH:
        raise _TooDeep(f"nested deeper than {MAX_NESTING_DEPTH} levels")
    return level + 1


# ---------------------------------------------------------------------------------------------
# Encoding and decoding contexts: the tensors of one message.


class _Encoding:
    __slots__ = ("tensors",)

    def __init__(self) -> None:
        self.tensors: list[WireTensor] = []

    def add(self, tensor: WireTensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


class _Decoding:
    __slots__ = ("tensors", "used")

    def __init__(self, tensors: list[WireTensor]) -> None:
        self.tensors = tensors
        self.used = [False] * len(tensors)

    def take(self, index: object) -> WireTensor:
        if type(index) is not int or not 0 <= index < len(self.tensors):
            raise _mismatch(f"a tensor index in 0..{len(self.tensors) - 1}", index)
        if self.used[index]:
            raise _Invalid(f"tensor {index} is referenced more than once")
        self.used[index] = True
        return self.tensors[index]

    def check_all_used(self) -> None:
        unused = [i for i, used in enumerate(self.used) if not used]
        if unused:
            raise _Invalid(f"tensors {unused} are not referenced by any field")


# ---------------------------------------------------------------------------------------------
# Schema kinds: one per supported type hint; each encodes a Python value to plain CBOR data and
# decodes plain CBOR data back, validating both ways. ``level`` is the nesting level of the
# container holding the value.


class _Kind:
    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        raise NotImplementedError

    def decode(self, value: object, ctx: _Decoding) -> object:
        raise NotImplementedError


class _Scalar(_Kind):
    """bool, str, bytes, None: exact CBOR types both ways (bool is never an int)."""

    __slots__ = ("name", "py_type")

    def __init__(self, py_type: type) -> None:
        self.py_type = py_type
        self.name = "null" if py_type is type(None) else py_type.__name__

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if type(value) is self.py_type:
            return value
        # A subclass (e.g. a StrEnum member) travels as its plain value.
        if self.py_type is str and isinstance(value, str):
            return str(value)
        if self.py_type is bytes and isinstance(value, bytes):
            return bytes(value)
        raise _mismatch(self.name, value)

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not self.py_type:
            raise _mismatch(self.name, value)
        return value


def _check_int(value: int) -> int:
    if not _INT_MIN <= value <= _INT_MAX:
        raise _Invalid(f"integer {value} is outside the signed 64-bit range")
    return value


class _Int(_Kind):
    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch("int", value)
        return _check_int(int(value))

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not int:
            raise _mismatch("int", value)
        return _check_int(value)


class _Float(_Kind):
    """Always a CBOR float on the wire; ints are accepted (and converted) only when encoding."""

    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if isinstance(value, float):
            return float(value)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise _Invalid(f"integer {value} does not fit a float") from None
        raise _mismatch("float", value)

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not float:
            raise _mismatch("float", value)
        return value


class _Optional(_Kind):
    __slots__ = ("inner",)

    def __init__(self, inner: _Kind) -> None:
        self.inner = inner

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        return None if value is None else self.inner.encode(value, ctx, level)

    def decode(self, value: object, ctx: _Decoding) -> object:
        return None if value is None else self.inner.decode(value, ctx)


class _VarTuple(_Kind):
    """``tuple[X, ...]``: a CBOR array."""

    __slots__ = ("item",)

    def __init__(self, item: _Kind) -> None:
        self.item = item

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, tuple):
            raise _mismatch("tuple", value)
        inner = _enter(level)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.item.encode(item, ctx, inner))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not list:
            raise _mismatch("array", value)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.item.decode(item, ctx))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return tuple(out)


class _FixedTuple(_Kind):
    """``tuple[X, Y, ...]`` of a fixed length: a CBOR array of that length."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[_Kind, ...]) -> None:
        self.items = items

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, tuple) or len(value) != len(self.items):
            raise _mismatch(f"tuple of {len(self.items)}", value)
        inner = _enter(level)
        out = []
        for i, (kind, item) in enumerate(zip(self.items, value, strict=True)):
            try:
                out.append(kind.encode(item, ctx, inner))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not list or len(value) != len(self.items):
            raise _mismatch(f"array of {len(self.items)}", value)
        out = []
        for i, (kind, item) in enumerate(zip(self.items, value, strict=True)):
            try:
                out.append(kind.decode(item, ctx))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return tuple(out)


class _Dict(_Kind):
    """``dict[str, X]``: a CBOR map with text keys."""

    __slots__ = ("value",)

    def __init__(self, value: _Kind) -> None:
        self.value = value

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, dict):
            raise _mismatch("dict", value)
        inner = _enter(level)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _mismatch("str key", key)
            try:
                out[str(key)] = self.value.encode(item, ctx, inner)
            except _Invalid as exc:
                exc.path.append(f"[{key!r}]")
                raise
        return out

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not dict:
            raise _mismatch("map", value)
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _mismatch("text key", key)
            try:
                out[key] = self.value.decode(item, ctx)
            except _Invalid as exc:
                exc.path.append(f"[{key[:40]!r}]")
                raise
        return out


class _Plain(_Kind):
    """``Any``/``object``: plain CBOR data (null, bool, int64, float, text, bytes, arrays, maps
    with text keys). Tuples are sent as arrays; arrays decode to lists."""

    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        return _plain(value, level, encoding=True)

    def decode(self, value: object, ctx: _Decoding) -> object:
        return _plain(value, 0, encoding=False)


_PLAIN_SCALARS: Final = (type(None), bool, float, str, bytes)


def _plain(value: object, level: int, *, encoding: bool) -> object:
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if kind is int:
        return _check_int(typing.cast(int, value))
    if kind is list or (encoding and kind is tuple):
        inner = _enter(level) if encoding else 0
        return [_plain(item, inner, encoding=encoding) for item in typing.cast(list[Any], value)]
    if kind is dict:
        inner = _enter(level) if encoding else 0
        out = {}
        for key, item in typing.cast(dict[Any, Any], value).items():
            if type(key) is not str:
                raise _mismatch("text key", key)
            out[key] = _plain(item, inner, encoding=encoding)
        return out
    raise _mismatch("plain CBOR data", value)


class _Tensor(_Kind):
    """A :class:`WireTensor`: the index of its descriptor in the header's tensor list."""

    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, WireTensor):
            raise _mismatch("WireTensor", value)
        return ctx.add(value)

    def decode(self, value: object, ctx: _Decoding) -> object:
        return ctx.take(value)


class _PeerId(_Kind):
    """A :class:`~distllm.ids.PeerID`: its 32-byte digest."""

    __slots__ = ()

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, PeerID):
            raise _mismatch("PeerID", value)
        return value.digest

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not bytes:
            raise _mismatch("bytes (peer id)", value)
        try:
            return PeerID(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None


class _Enum(_Kind):
    """An ``enum.Enum`` whose values are all str or all int: the member's value."""

    __slots__ = ("cls", "value_type")

    def __init__(self, cls: type[enum.Enum], value_type: type) -> None:
        self.cls = cls
        self.value_type = value_type

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if not isinstance(value, self.cls):
            raise _mismatch(self.cls.__name__, value)
        return value.value

    def decode(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not self.value_type:
            raise _mismatch(f"{self.value_type.__name__} ({self.cls.__name__})", value)
        try:
            return self.cls(value)
        except (ValueError, TypeError):
            raise _mismatch(f"a value of {self.cls.__name__}", value) from None


class _Literal(_Kind):
    """``Literal[...]`` of str, int and bool values (matched with their exact type)."""

    __slots__ = ("values",)

    def __init__(self, values: tuple[object, ...]) -> None:
        self.values = values

    def _check(self, value: object) -> object:
        for allowed in self.values:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise _mismatch(f"one of {self.values!r}", value)

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        return self._check(value)

    def decode(self, value: object, ctx: _Decoding) -> object:
        return self._check(value)


class _Nested(_Kind):
    """A registered message type as a field: a map of its fields (no type name)."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def encode(self, value: object, ctx: _Encoding, level: int) -> object:
        if type(value) is not self.cls:
            raise _mismatch(self.cls.__qualname__, value)
        return _schema_of(self.cls).encode_fields(value, ctx, _enter(level))

    def decode(self, value: object, ctx: _Decoding) -> object:
        return _schema_of(self.cls).decode_fields(value, ctx)


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    cls: type
    type_name: str
    fields: tuple[tuple[str, _Kind], ...]
    names: frozenset[str]

    def encode_fields(self, msg: object, ctx: _Encoding, level: int) -> dict[str, object]:
        out = {}
        for name, kind in self.fields:
            try:
                out[name] = kind.encode(getattr(msg, name), ctx, level)
            except _Invalid as exc:
                exc.path.append(f".{name}")
                raise
        return out

    def decode_fields(self, value: object, ctx: _Decoding) -> object:
        if type(value) is not dict:
            raise _mismatch(f"a map of {self.cls.__qualname__} fields", value)
        if value.keys() != self.names:
            raise _Invalid(self._key_problem(value))
        kwargs = {}
        for name, kind in self.fields:
            try:
                kwargs[name] = kind.decode(value[name], ctx)
            except _Invalid as exc:
                exc.path.append(f".{name}")
                raise
        try:
            return self.cls(**kwargs)
        except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
            # The message's own validators (__post_init__) rejected the values.
            raise _Invalid(f"invalid {self.cls.__qualname__}: {str(exc)[:200]}") from None

    def _key_problem(self, value: dict[Any, Any]) -> str:
        missing = sorted(self.names - value.keys())
        extra = sorted(repr(key)[:40] for key in value.keys() - self.names)
        problems = [f"missing fields {missing}"] if missing else []
        problems += [f"unknown fields {extra[:5]}"] if extra else []
        return f"{self.cls.__qualname__}: " + ", ".join(problems)


# ---------------------------------------------------------------------------------------------
# Registration: type hints -> schema kinds.


@dataclasses.dataclass(slots=True)
class _Registration:
    cls: type
    type_name: str
    schema: _Schema | None  # None until forward references resolve (e.g. recursive types)


_by_name: dict[str, _Registration] = {}
_by_class: dict[type, _Registration] = {}
_types: dict[str, type] = {}

_SIMPLE_KINDS: Final[dict[object, _Kind]] = {
    bool: _Scalar(bool),
    str: _Scalar(str),
    bytes: _Scalar(bytes),
    type(None): _Scalar(type(None)),
    None: _Scalar(type(None)),
    int: _Int(),
    float: _Float(),
    WireTensor: _Tensor(),
    PeerID: _PeerId(),
    Any: _Plain(),
    object: _Plain(),
}


def message(type_name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a frozen dataclass as the wire message type ``type_name``.

    ``type_name`` (letters, digits, ``_ . -``; at most 128 characters, starting with a letter) is
    what identifies the type on the wire; it must be unique. Supported field types: ``bool``,
    ``int`` (signed 64-bit), ``float``, ``str``, ``bytes``, ``None``, ``X | None``,
    ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, :class:`WireTensor`,
    :class:`~distllm.ids.PeerID`, other registered message types, ``enum.Enum`` subclasses with
    all-str or all-int values, ``Literal[...]`` of str/int/bool, and ``Any`` for plain CBOR data.
    Raises ``TypeError`` for anything else, ``ValueError`` for a bad or duplicate name.
    """
    if not isinstance(type_name, str) or not _TYPE_NAME.fullmatch(type_name):
        raise ValueError(f"invalid message type name {type_name!r}")

    def register(cls: type[T]) -> type[T]:
        _check_message_class(cls)
        if type_name in _by_name:
            existing = _by_name[type_name].cls.__qualname__
            raise ValueError(f"message type {type_name!r} is already registered by {existing}")
        if cls in _by_class:
            raise ValueError(f"{cls.__qualname__} is already registered")
        registration = _Registration(cls, type_name, None)
        _by_name[type_name] = _by_class[cls] = registration
        try:
            registration.schema = _compile_schema(cls, type_name)
        except NameError:
            pass  # a forward reference (e.g. to cls itself): compiled on first use
        except Exception:
            del _by_name[type_name], _by_class[cls]
            raise
        _types[type_name] = cls
        return cls

    return register


def registered_types() -> Mapping[str, type]:
    """A read-only, live view: wire type name -> message class."""
    return types.MappingProxyType(_types)


def _check_message_class(cls: type) -> None:
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"@message needs a dataclass, got {cls!r}")
    if not getattr(cls, "__dataclass_params__").frozen:  # noqa: B009 (untyped attribute)
        raise TypeError(f"{cls.__qualname__} must be a frozen dataclass")


def _schema_of(cls: type) -> _Schema:
    registration = _by_class[cls]
    if registration.schema is None:
        try:
            registration.schema = _compile_schema(cls, registration.type_name)
        except NameError as exc:
            raise TypeError(f"cannot resolve the type hints of {cls.__qualname__}: {exc}") from exc
    return registration.schema


def _compile_schema(cls: type, type_name: str) -> _Schema:
    hints = typing.get_type_hints(cls)
    compiled = []
    for field in dataclasses.fields(cls):
        if not field.init:
            raise TypeError(f"{cls.__qualname__}.{field.name}: init=False fields cannot travel")
        try:
            compiled.append((field.name, _compile_hint(hints[field.name], cls)))
        except TypeError as exc:
            raise TypeError(f"{cls.__qualname__}.{field.name}: {exc}") from None
    names = frozenset(name for name, _ in compiled)
    return _Schema(cls, type_name, tuple(compiled), names)


def _compile_hint(hint: Any, owner: type) -> _Kind:
    try:
        scalar = _SIMPLE_KINDS.get(hint)
    except TypeError:  # an unhashable hint
        scalar = None
    if scalar is not None:
        return scalar
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1 or len(others) == len(args):
            raise TypeError(f"unions other than X | None are not supported: {hint!r}")
        return _Optional(_compile_hint(others[0], owner))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _VarTuple(_compile_hint(args[0], owner))
        return _FixedTuple(tuple(_compile_hint(arg, owner) for arg in args))
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"dict keys must be str: {hint!r}")
        return _Dict(_compile_hint(args[1], owner))
    if origin is Literal:
        return _compile_literal(args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _compile_enum(hint)
    if isinstance(hint, type) and (hint is owner or hint in _by_class):
        return _Nested(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        raise TypeError(f"{hint.__qualname__} is not a registered message type (use @message)")
    raise TypeError(f"unsupported field type {hint!r}")


def _compile_literal(values: tuple[Any, ...]) -> _Kind:
    for value in values:
        if type(value) not in (str, int, bool):
            raise TypeError(f"Literal values must be str, int or bool, got {value!r}")
        if type(value) is int:
            _check_literal_int(value)
    return _Literal(values)


def _check_literal_int(value: int) -> None:
    if not _INT_MIN <= value <= _INT_MAX:
        raise TypeError(f"{value} is outside the signed 64-bit range")


def _compile_enum(cls: type[enum.Enum]) -> _Kind:
    if issubclass(cls, enum.Flag):
        raise TypeError(f"Flag enums are not supported: {cls.__qualname__}")
    value_types = {type(member.value) for member in cls}
    if value_types == {str}:
        return _Enum(cls, str)
    if value_types == {int}:
        for member in cls:
            _check_literal_int(member.value)
        return _Enum(cls, int)
    raise TypeError(f"{cls.__qualname__} values must be all str or all int")


# ---------------------------------------------------------------------------------------------
# Encoding.


def encode_message(msg: object, limits: WireLimits = _DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Encode a registered message as the parts of a frame body: header first, then payloads
    (large payloads are the tensors' own buffers, not copies).

    Raises ``LocalProtocolError`` if ``msg`` is not of a registered type or a field does not fit
    its type, ``LimitExceeded`` if the message breaks ``limits`` (or nests too deep).
    """
    registration = _by_class.get(type(msg))
    if registration is None:
        raise LocalProtocolError(f"{type(msg).__qualname__} is not a registered message type")
    name = registration.type_name
    ctx = _Encoding()
    try:
        fields = _schema_of(type(msg)).encode_fields(msg, ctx, _FIELDS_LEVEL)
    except _TooDeep as exc:
        exc.path.append(name)
        raise LimitExceeded(f"cannot encode {exc.describe()}") from None
    except _Invalid as exc:
        exc.path.append(name)
        raise LocalProtocolError(f"cannot encode {exc.describe()}") from None
    descriptors = _describe_tensors(name, ctx.tensors, limits)
    header = _dump_header(
        {"version": PROTOCOL_VERSION, "type": name, "fields": fields, "tensors": descriptors}
    )
    if len(header) > limits.max_header_bytes:
        raise LimitExceeded(
            f"{name} header is {len(header)} bytes; max_header_bytes is {limits.max_header_bytes}"
        )
    return _assemble(name, header, ctx.tensors, limits)


def _describe_tensors(
    name: str, tensors: list[WireTensor], limits: WireLimits
) -> list[list[object]]:
    if len(tensors) > limits.max_tensors_per_message:
        raise LimitExceeded(
            f"{name} carries {len(tensors)} tensors; "
            f"max_tensors_per_message is {limits.max_tensors_per_message}"
        )
    descriptors: list[list[object]] = []
    for tensor in tensors:
        if len(tensor.shape) > limits.max_tensor_dims:
            raise LimitExceeded(
                f"{name}: {tensor!r} has {len(tensor.shape)} dimensions; "
                f"max_tensor_dims is {limits.max_tensor_dims}"
            )
        if max(len(tensor.data), tensor.nbytes) > limits.max_tensor_bytes:
            raise LimitExceeded(
                f"{name}: {tensor!r} ({tensor.nbytes} bytes decoded) exceeds "
                f"max_tensor_bytes {limits.max_tensor_bytes}"
            )
        descriptors.append([tensor.dtype, list(tensor.shape), tensor.compression, len(tensor.data)])
    return descriptors


def _dump_header(header: dict[str, object]) -> bytes:
    try:
        # Canonical: deterministic bytes (sorted keys, shortest exact floats).
        return cbor2.dumps(header, canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:  # e.g. lone surrogates
        raise LocalProtocolError(f"cannot encode {header['type']}: {exc}") from None


def _assemble(
    name: str, header: bytes, tensors: list[WireTensor], limits: WireLimits
) -> list[bytes | memoryview]:
    parts: list[bytes | memoryview] = []
    chunk = bytearray(HEADER_LENGTH.pack(len(header)))
    chunk += header
    offset = len(chunk)
    for tensor in tensors:
        chunk += bytes(-offset % PAYLOAD_ALIGNMENT)
        offset += -offset % PAYLOAD_ALIGNMENT + len(tensor.data)
        if len(tensor.data) < _COALESCE_BYTES:
            chunk += tensor.data
        else:
            parts += (bytes(chunk), tensor.data)
            chunk = bytearray()
    if chunk:
        parts.append(bytes(chunk))
    if offset > limits.max_frame_bytes:
        raise LimitExceeded(
            f"{name} is {offset} bytes; max_frame_bytes is {limits.max_frame_bytes}"
        )
    return parts


# ---------------------------------------------------------------------------------------------
# Decoding.


def decode_message(
    body: bytes | bytearray | memoryview, limits: WireLimits = _DEFAULT_LIMITS
) -> object:
    """Decode one message body (as produced by :func:`encode_message`).

    Tensor payloads are memoryview slices of ``body`` (zero copy). Raises only
    ``RemoteProtocolError`` for bad input, whatever the bytes.
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    try:
        return _decode(view, limits)
    except _Invalid as exc:
        raise RemoteProtocolError(exc.describe()) from None


def _decode(view: memoryview, limits: WireLimits) -> object:
    size = len(view)
    if size > limits.max_frame_bytes:
        raise _Invalid(f"message of {size} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    if size < HEADER_LENGTH.size:
        raise _Invalid(f"message of {size} bytes is too short for its header length")
    (header_len,) = HEADER_LENGTH.unpack_from(view)
    if header_len > limits.max_header_bytes:
        raise _Invalid(f"header of {header_len} bytes exceeds max_header_bytes")
    payload_start = HEADER_LENGTH.size + header_len
    if payload_start > size:
        raise _Invalid(f"header of {header_len} bytes runs past the end of the message")
    header = _load_header(view[HEADER_LENGTH.size : payload_start])
    type_name, fields, descriptors = _parse_header(header)
    registration = _by_name.get(type_name)
    if registration is None:
        raise _Invalid(f"unknown message type {type_name[:130]!r}")
    ctx = _Decoding(_decode_tensors(descriptors, view, payload_start, limits))
    try:
        msg = _schema_of(registration.cls).decode_fields(fields, ctx)
        ctx.check_all_used()
    except _Invalid as exc:
        exc.path.append(type_name)
        raise
    return msg


def _reject_tag(*_: object) -> typing.NoReturn:
    raise _Invalid("CBOR tags are not allowed in headers")


class _RejectAllTags(dict[int, Callable[..., Any]]):
    """cbor2's semantic decoders, every one replaced by a rejection (no bignums, shared
    references, dates...: we never emit tags, and some expand exponentially)."""

    def __missing__(self, key: int) -> Callable[..., Any]:
        return _reject_tag


# The tags cbor2 decodes by itself, listed too in case a cbor2 version bypasses __missing__.
_CBOR2_TAGS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260)
_NO_SEMANTIC_TAGS: Final = _RejectAllTags.fromkeys(
    (*_CBOR2_TAGS, 261, 1004, 1040, 43000, 55799), _reject_tag
)


def _load_header(raw: memoryview) -> object:
    stream = io.BytesIO(raw)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_SEMANTIC_TAGS,
            max_depth=MAX_NESTING_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        header = decoder.decode()
    except (
        cbor2.CBORError,
        ValueError,
        TypeError,
        OverflowError,
        LookupError,
        RecursionError,
        EOFError,
    ) as exc:
        raise _Invalid(f"malformed CBOR header: {str(exc)[:200]}") from None
    if stream.tell() != len(raw):
        raise _Invalid(f"{len(raw) - stream.tell()} bytes follow the CBOR header")
    return header


def _parse_header(header: object) -> tuple[str, object, list[object]]:
    if type(header) is not dict:
        raise _mismatch("a header map", header)
    version = header.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _Invalid(f"unsupported protocol version {version!r} (we speak {PROTOCOL_VERSION})")
    if header.keys() != _HEADER_KEYS:
        raise _Invalid(f"header keys must be exactly {sorted(_HEADER_KEYS)}")
    type_name, fields, descriptors = header["type"], header["fields"], header["tensors"]
    if type(type_name) is not str:
        raise _mismatch("a text message type", type_name)
    if type(descriptors) is not list:
        raise _mismatch("an array of tensor descriptors", descriptors)
    return type_name, fields, descriptors


def _decode_tensors(
    descriptors: list[object], view: memoryview, offset: int, limits: WireLimits
) -> list[WireTensor]:
    if len(descriptors) > limits.max_tensors_per_message:
        raise _Invalid(f"{len(descriptors)} tensors exceed max_tensors_per_message")
    tensors = []
    for index, descriptor in enumerate(descriptors):
        try:
            dtype, shape, compression, nbytes = _parse_descriptor(descriptor, limits)
        except _Invalid as exc:
            exc.path.append(f"tensor {index}")
            raise
        start = offset + -offset % PAYLOAD_ALIGNMENT
        end = start + nbytes
        if end > len(view):
            raise _Invalid(f"tensor {index}: payload runs past the end of the message")
        if any(view[offset:start]):
            raise _Invalid(f"tensor {index}: non-zero padding before the payload")
        data = view[start:end]
        if dtype == "bool" and nbytes and int(np.frombuffer(data, np.uint8).max()) > 1:
            raise _Invalid(f"tensor {index}: bool payload holds bytes other than 0 and 1")
        try:
            tensors.append(WireTensor(dtype, shape, compression, data))
        except (ValueError, TypeError) as exc:  # defensive: the checks above make this unreachable
            raise _Invalid(f"tensor {index}: {exc}") from None
        offset = end
    if offset != len(view):
        raise _Invalid(f"message is {len(view)} bytes but its parts end at byte {offset}")
    return tensors


def _parse_descriptor(
    descriptor: object, limits: WireLimits
) -> tuple[str, tuple[int, ...], str, int]:
    if type(descriptor) is not list or len(descriptor) != 4:
        raise _mismatch("[dtype, shape, compression, nbytes]", descriptor)
    dtype, shape, compression, nbytes = descriptor
    if type(dtype) is not str or dtype not in DTYPES:
        raise _mismatch(f"a dtype in {DTYPES}", dtype)
    if type(shape) is not list:
        raise _mismatch("a shape array", shape)
    if len(shape) > limits.max_tensor_dims:
        raise _Invalid(f"{len(shape)} dimensions exceed max_tensor_dims {limits.max_tensor_dims}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM_SIZE:
            raise _mismatch(f"dimensions in 0..{MAX_DIM_SIZE}", dim)
    if type(compression) is not str or compression not in codecs_for(dtype):
        raise _mismatch(f"a compression in {codecs_for(dtype)}", compression)
    dims = tuple(shape)
    expected = payload_nbytes(dtype, dims, compression)
    decoded = payload_nbytes(dtype, dims, "none")
    if max(expected, decoded) > limits.max_tensor_bytes:
        raise _Invalid(f"{dtype}{shape} tensor exceeds max_tensor_bytes {limits.max_tensor_bytes}")
    if type(nbytes) is not int or nbytes != expected:
        raise _Invalid(f"says {nbytes!r} payload bytes; {dtype}{shape} {compression} is {expected}")
    return dtype, dims, compression, nbytes
