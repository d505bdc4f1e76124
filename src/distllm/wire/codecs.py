"""Lossy compression of float activations (pure numpy, vectorised).

Every codec turns a float32 array into a little-endian payload and back. The codecs and the error
each one introduces (``x`` an input value, ``y`` its decoded value; see ``docs/protocol.md`` §5):

- ``"none"``: raw float32, exact.
- ``"float16"``: IEEE half, round to nearest even: ``|y - x| <= max(|x| * 2**-11, 2**-25)``.
  Finite values that would round to infinity (``|x| >= 65520``) raise ``ValueError``: a silent
  infinity would poison every later layer; use ``"bfloat16"`` for wide-range activations.
- ``"bfloat16"``: the top half of the float32 bits, round to nearest even:
  ``|y - x| <= max(|x| * 2**-8, 2**-134)``. Overflow to infinity raises ``ValueError`` as well.
- ``"int8_blockwise"``: blocks of :data:`INT8_BLOCK_SIZE` consecutive elements (C order; the last
  block may be shorter) share one float32 scale ``absmax / 127``; each element is stored as
  ``round(x / scale)`` in int8. ``|y - x| <= absmax_of_block / 254`` (plus float32 rounding,
  ``absmax * 2**-20`` at most, and ``2**-140`` when the scale is subnormal). NaN and infinities
  cannot be represented and raise ``ValueError``.

NaN and infinities pass through ``"float16"`` and ``"bfloat16"`` unchanged (NaN stays NaN).
Decoding never validates values: a peer could send NaN in an uncompressed tensor just as well.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CODECS",
    "INT8_BLOCK_SIZE",
    "bfloat16_bits_to_float32",
    "compress",
    "decompress",
    "encoded_nbytes",
    "float32_to_bfloat16_bits",
]

CODECS: Final[tuple[str, ...]] = ("none", "float16", "bfloat16", "int8_blockwise")
#: Elements sharing one scale in ``int8_blockwise``.
INT8_BLOCK_SIZE: Final = 64

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")

Float32Array = npt.NDArray[np.float32]


def encoded_nbytes(codec: str, numel: int, itemsize: int = 4) -> int:
    """Payload size of ``numel`` elements; ``itemsize`` is the raw element size for ``"none"``."""
    if codec == "none":
        return numel * itemsize
    if codec in ("float16", "bfloat16"):
        return numel * 2
    if codec == "int8_blockwise":
        return 4 * _num_blocks(numel) + numel
    raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")


def compress(values: npt.ArrayLike, codec: str) -> memoryview:
    """Encode float32 ``values`` (any shape, read in C order) with ``codec``.

    Returns a byte-format memoryview; it may share memory with ``values`` for ``"none"``.
    Raises ``ValueError`` for values the codec cannot carry (see the module docstring).
    """
    flat = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    if codec == "none":
        return _byte_view(flat)
    if codec == "float16":
        return _byte_view(_to_float16(flat))
    if codec == "bfloat16":
        return _byte_view(_checked_bfloat16(flat))
    if codec == "int8_blockwise":
        return _quantize(flat)
    raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")


def decompress(payload: bytes | memoryview, codec: str, numel: int) -> Float32Array:
    """Decode a payload made by :func:`compress` into a fresh 1-D float32 array of ``numel``.

    The payload length must be exactly ``encoded_nbytes(codec, numel)`` (``ValueError`` if not).
    """
    expected = encoded_nbytes(codec, numel)
    if len(memoryview(payload).cast("B")) != expected:
        raise ValueError(f"{codec} payload of {numel} elements must be {expected} bytes")
    if codec == "none":
        return np.frombuffer(payload, dtype=_F32).copy()
    if codec == "float16":
        return np.frombuffer(payload, dtype=_F16).astype(_F32)
    if codec == "bfloat16":
        return bfloat16_bits_to_float32(np.frombuffer(payload, dtype=_U16))
    return _dequantize(payload, numel)


def float32_to_bfloat16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of float32 values, rounded to nearest even; NaN stays (quiet) NaN.

    Finite values beyond the bfloat16 range become infinities (no error here).
    """
    x = np.require(values, dtype=_F32, requirements="C")
    bits = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest even.
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(_U16)
    nan = np.isnan(x)
    if nan.any():
        # Truncation could clear every mantissa bit of a NaN and make it an infinity.
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(_U16)
    return out


def bfloat16_bits_to_float32(bits: npt.ArrayLike) -> Float32Array:
    """float32 values of bfloat16 bit patterns (exact)."""
    wide = np.asarray(bits, dtype=_U16).astype(np.uint32)
    wide <<= 16
    return wide.view(_F32)


def _to_float16(flat: Float32Array) -> npt.NDArray[np.float16]:
    with np.errstate(over="ignore"):
        half = flat.astype(_F16)
    _reject_overflow(flat, np.isinf(half), "float16", "65520")
    return half


def _checked_bfloat16(flat: Float32Array) -> npt.NDArray[np.uint16]:
    bits = float32_to_bfloat16_bits(flat)
    _reject_overflow(flat, (bits & 0x7FFF) == 0x7F80, "bfloat16", "3.3961e38")
    return bits


def _reject_overflow(
    flat: Float32Array, is_inf: npt.NDArray[np.bool_], codec: str, limit: str
) -> None:
    # Checking the (rare) infinities of the output first keeps the common path to one pass.
    if is_inf.any() and (is_inf & np.isfinite(flat)).any():
        raise ValueError(
            f"{codec} cannot carry finite values of magnitude >= {limit} (they would become "
            "infinite); use the bfloat16 or int8_blockwise codec, or no compression"
        )


def _num_blocks(numel: int) -> int:
    return -(-numel // INT8_BLOCK_SIZE)


def _quantize(flat: Float32Array) -> memoryview:
    """Payload: ``n_blocks`` float32 scales, then ``numel`` int8 codes."""
    numel = flat.size
    n_blocks = _num_blocks(numel)
    payload = np.empty(4 * n_blocks + numel, dtype=np.uint8)
    scales = payload[: 4 * n_blocks].view(_F32)
    codes = payload[4 * n_blocks :].view(np.int8)
    full = numel // INT8_BLOCK_SIZE * INT8_BLOCK_SIZE
    if full:
        _quantize_blocks(
            flat[:full].reshape(-1, INT8_BLOCK_SIZE),  # (full blocks, block size)
            scales[: full // INT8_BLOCK_SIZE],
            codes[:full].reshape(-1, INT8_BLOCK_SIZE),
        )
    if full < numel:
        _quantize_blocks(flat[full:].reshape(1, -1), scales[-1:], codes[full:].reshape(1, -1))
    return _byte_view(payload)


def _quantize_blocks(
    blocks: Float32Array, scales_out: Float32Array, codes_out: npt.NDArray[np.int8]
) -> None:
    # max and -min instead of abs().max(): no temporary as large as the input.
    absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))
    if not np.isfinite(absmax).all():
        raise ValueError("int8_blockwise cannot carry NaN or infinite values")
    scale = absmax / np.float32(127)
    with np.errstate(over="ignore"):
        # Near the float32 maximum, 127 * scale could round up to infinity when decoded.
        scale = np.where(np.isinf(scale * np.float32(127)), np.nextafter(scale, 0), scale)
    divisor = np.where(scale > 0, scale, np.float32(1))  # all-zero blocks: codes 0, scale 0
    ratios = blocks / divisor[:, None]  # (blocks, block size)
    np.rint(ratios, out=ratios)
    np.clip(ratios, -127, 127, out=ratios)
    np.copyto(codes_out, ratios, casting="unsafe")
    scales_out[:] = scale


def _dequantize(payload: bytes | memoryview, numel: int) -> Float32Array:
    n_blocks = _num_blocks(numel)
    scales = np.frombuffer(payload, dtype=_F32, count=n_blocks)
    codes = np.frombuffer(payload, dtype=np.int8, offset=4 * n_blocks)
    out = np.empty(numel, dtype=_F32)
    full = numel // INT8_BLOCK_SIZE * INT8_BLOCK_SIZE
    # A peer's scales may be NaN or huge: the result is garbage, but no warning or error.
    with np.errstate(over="ignore", invalid="ignore"):
        if full:
            np.multiply(
                codes[:full].reshape(-1, INT8_BLOCK_SIZE),  # (full blocks, block size)
                scales[: full // INT8_BLOCK_SIZE, None],
                out=out[:full].reshape(-1, INT8_BLOCK_SIZE),
            )
        if full < numel:
            np.multiply(codes[full:], scales[-1], out=out[full:])
    return out


def _byte_view(array: npt.NDArray[np.generic]) -> memoryview:
    """A flat byte-format memoryview of a C-contiguous array (no copy)."""
    return array.reshape(-1).view(np.uint8).data
