"""Tensors on the wire: dtype, shape, codec and the encoded payload bytes (pure).

A :class:`WireTensor` is valid by construction: its payload length always matches what its dtype,
shape and codec imply. Payloads travel without copies where possible: ``data`` may be a view of
the caller's array (``from_numpy`` with no compression) or of a received frame (decoding).

numpy has no bfloat16: bfloat16 values are handled as their ``uint16`` bit patterns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt

from distllm.wire.codecs import (
    CODECS,
    bfloat16_bits_to_float32,
    compress,
    decompress,
    encoded_nbytes,
    float32_to_bfloat16_bits,
)

__all__ = [
    "DTYPES",
    "MAX_DIM_SIZE",
    "WireTensor",
    "codecs_for",
    "payload_nbytes",
    "storage_dtype",
]

DTYPES: Final[tuple[str, ...]] = (
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "uint8",
    "bool",
)
#: Largest size of one dimension (it bounds the shapes of empty tensors too).
MAX_DIM_SIZE: Final = 2**32 - 1

# Little-endian numpy dtypes holding each wire dtype's values.
_STORAGE: Final[dict[str, np.dtype[Any]]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_INFERRED: Final = {dtype: name for name, dtype in _STORAGE.items() if name != "bfloat16"}
# Lossy codecs only where they shrink the payload without narrowing the range: float16 data
# through bfloat16 could decode to infinities, and bfloat16 through float16 would overflow.
_CODECS_FOR: Final[dict[str, tuple[str, ...]]] = {
    "float32": CODECS,
    "float16": ("none", "float16", "int8_blockwise"),
    "bfloat16": ("none", "bfloat16", "int8_blockwise"),
}


def storage_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype of :meth:`WireTensor.to_numpy` for ``dtype`` (``uint16`` for bfloat16)."""
    _check_dtype(dtype)
    return _STORAGE[dtype]


def codecs_for(dtype: str) -> tuple[str, ...]:
    """The compressions a tensor of ``dtype`` may use. Integers and bool: ``("none",)`` only."""
    _check_dtype(dtype)
    return _CODECS_FOR.get(dtype, ("none",))


def payload_nbytes(dtype: str, shape: tuple[int, ...], compression: str) -> int:
    """Encoded payload size of a tensor (no validation of the arguments)."""
    numel = math.prod(shape)
    if _is_raw(dtype, compression):
        return numel * _STORAGE[dtype].itemsize
    return encoded_nbytes(compression, numel)


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as carried in a message.

    Invariants (checked on construction, ``ValueError``/``TypeError`` otherwise): ``dtype`` is in
    :data:`DTYPES`; ``compression`` is in ``codecs_for(dtype)``; ``shape`` is a tuple of ints in
    ``0..MAX_DIM_SIZE``; ``len(data) == payload_nbytes(dtype, shape, compression)``.
    """

    #: dtype of the decoded tensor.
    dtype: str
    shape: tuple[int, ...]
    #: Codec of the payload: ``"none"`` means raw little-endian ``dtype`` bytes.
    compression: str
    #: The encoded payload (a flat byte memoryview when not ``bytes``).
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)
        _check_shape(self.shape)
        if self.compression not in codecs_for(self.dtype):
            raise ValueError(
                f"compression {self.compression!r} is not allowed for {self.dtype} "
                f"(allowed: {codecs_for(self.dtype)})"
            )
        if not isinstance(self.data, bytes | memoryview):
            raise TypeError(f"data must be bytes or memoryview, not {type(self.data).__name__}")
        if isinstance(self.data, memoryview) and (self.data.format != "B" or self.data.ndim != 1):
            object.__setattr__(self, "data", self.data.cast("B"))
        expected = payload_nbytes(self.dtype, self.shape, self.compression)
        if len(self.data) != expected:
            raise ValueError(
                f"{self.compression} payload of a {self.dtype}{list(self.shape)} tensor must be "
                f"{expected} bytes, got {len(self.data)}"
            )

    @classmethod
    def from_numpy(
        cls, array: npt.ArrayLike, compression: str = "none", *, dtype: str | None = None
    ) -> Self:
        """Wrap an array, compressed with ``compression``.

        ``dtype`` is the wire dtype, inferred from the array when ``None`` (pass
        ``dtype="bfloat16"`` for uint16 bit patterns or to convert floats to bfloat16, and e.g.
        ``dtype="float32"`` for float64 arrays). Without compression the payload is a view of the
        array when it is C-contiguous and little-endian: do not modify it until sent.
        Raises ``TypeError`` for unsupported dtypes, ``ValueError`` for a disallowed codec or
        values the codec cannot carry.
        """
        arr = np.asarray(array)
        wire_dtype = _infer_dtype(arr.dtype) if dtype is None else dtype
        _check_dtype(wire_dtype)
        return cls._from_values(_as_storage(arr, wire_dtype), wire_dtype, compression)

    @classmethod
    def from_buffer(
        cls,
        buffer: bytes | bytearray | memoryview,
        dtype: str,
        shape: Iterable[int],
        compression: str = "none",
    ) -> Self:
        """Wrap raw little-endian bytes of a tensor already in ``dtype`` (e.g. the bytes of a
        torch bfloat16 tensor), compressed as asked. No copy without compression."""
        _check_dtype(dtype)
        dims = tuple(shape)
        _check_shape(dims)
        raw = memoryview(buffer).cast("B")
        expected = math.prod(dims) * _STORAGE[dtype].itemsize
        if len(raw) != expected:
            raise ValueError(f"a {dtype}{list(dims)} tensor is {expected} bytes, got {len(raw)}")
        if compression == "none":
            return cls(dtype, dims, compression, raw)
        values = np.frombuffer(raw, dtype=_STORAGE[dtype]).reshape(dims)
        return cls._from_values(values, dtype, compression)

    @classmethod
    def _from_values(cls, values: npt.NDArray[Any], dtype: str, compression: str) -> Self:
        if compression not in codecs_for(dtype):
            raise ValueError(
                f"compression {compression!r} is not allowed for {dtype} "
                f"(allowed: {codecs_for(dtype)})"
            )
        if _is_raw(dtype, compression):
            data = np.ascontiguousarray(values).reshape(-1).view(np.uint8).data
        else:
            data = compress(_to_float32(values, dtype), compression)
        return cls(dtype, tuple(values.shape), compression, data)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the decoded tensor in bytes."""
        return self.numel * _STORAGE[self.dtype].itemsize

    def to_numpy(self) -> npt.NDArray[Any]:
        """The decoded array, of dtype ``storage_dtype(self.dtype)``: bfloat16 comes back as
        ``uint16`` bit patterns. Without compression it is a view of ``data`` (zero copy; it is
        writable when ``data`` is, and then shares memory with the received frame)."""
        if _is_raw(self.dtype, self.compression):
            return np.frombuffer(self.data, dtype=_STORAGE[self.dtype]).reshape(self.shape)
        values = decompress(self.data, self.compression, self.numel)
        return _from_float32(values, self.dtype).reshape(self.shape)

    def decoded_bytes(self) -> bytes | memoryview:
        """Raw little-endian bytes of the decoded tensor in ``dtype`` (``data`` itself when
        uncompressed), e.g. for ``torch.frombuffer(t.decoded_bytes(), dtype=torch.bfloat16)``."""
        if _is_raw(self.dtype, self.compression):
            return self.data
        return self.to_numpy().reshape(-1).view(np.uint8).data

    def __repr__(self) -> str:
        return (
            f"WireTensor({self.dtype}{list(self.shape)}, compression={self.compression!r}, "
            f"{len(self.data)} bytes)"
        )


def _is_raw(dtype: str, compression: str) -> bool:
    # A codec equal to the dtype (float16 data as float16) changes nothing: raw bytes.
    return compression in ("none", dtype)


def _check_dtype(dtype: object) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")


def _check_shape(shape: object) -> None:
    if not isinstance(shape, tuple):
        raise TypeError(f"shape must be a tuple, not {type(shape).__name__}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM_SIZE:
            raise ValueError(f"shape dimensions must be ints in 0..{MAX_DIM_SIZE}, got {shape!r}")


def _infer_dtype(dtype: np.dtype[Any]) -> str:
    name = _INFERRED.get(dtype.newbyteorder("<"))
    if name is None:
        hint = " (pass dtype='bfloat16' for bfloat16 bit patterns)" if dtype.kind == "u" else ""
        raise TypeError(f"no wire dtype for numpy {dtype}; pass dtype= explicitly{hint}")
    return name


def _as_storage(arr: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """The array's values in ``dtype``'s little-endian storage dtype, C-contiguous."""
    target = _STORAGE[dtype]
    if dtype == "bfloat16" and arr.dtype.kind == "f":
        return float32_to_bfloat16_bits(arr.astype(np.float32)).reshape(arr.shape)
    if dtype == "bfloat16" and arr.dtype.newbyteorder("<") != target:
        raise TypeError(f"bfloat16 takes float arrays or uint16 bit patterns, not {arr.dtype}")
    if arr.dtype == target:
        return np.require(arr, requirements="C")  # unlike ascontiguousarray, keeps 0-d shapes
    try:
        return arr.astype(target, order="C", casting="same_kind")
    except TypeError as exc:  # numpy's casting error is a TypeError subclass
        raise TypeError(f"cannot send a numpy {arr.dtype} array as {dtype}") from exc


def _to_float32(values: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float32]:
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(values)
    return values.astype(np.float32, copy=False)


def _from_float32(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[Any]:
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    with np.errstate(over="ignore"):  # a peer's garbage scales may overflow float16
        return values.astype(_STORAGE[dtype], copy=False)
