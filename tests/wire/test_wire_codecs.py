"""Compression codecs: the documented error bounds, NaN/infinity handling, exact sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distllm.wire.codecs import (
    CODECS,
    INT8_BLOCK_SIZE,
    bfloat16_bits_to_float32,
    compress,
    decompress,
    encoded_nbytes,
    float32_to_bfloat16_bits,
)

F16_MAX = 65504.0


def float32_arrays(max_magnitude: float | None = None, max_size: int = 300) -> st.SearchStrategy:
    """float32 arrays mixing zeros, subnormals, tiny, ordinary and huge values."""
    elements = st.floats(
        width=32,
        allow_nan=False,
        allow_infinity=False,
        min_value=None if max_magnitude is None else -max_magnitude,
        max_value=max_magnitude,
    )
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_size // 10)
    return hnp.arrays(np.float32, shapes, elements=elements)


def roundtrip(values: np.ndarray, codec: str) -> np.ndarray:
    payload = compress(values, codec)
    assert len(payload) == encoded_nbytes(codec, values.size)
    return decompress(payload, codec, values.size).reshape(values.shape)


def exact_error(decoded: np.ndarray, original: np.ndarray) -> np.ndarray:
    # float64 holds every float32 and their differences exactly (up to one rounding).
    return np.abs(decoded.astype(np.float64) - original.astype(np.float64))


# Smallest magnitudes that round to infinity.
F16_OVERFLOW = 65520.0
BF16_OVERFLOW = 2.0**128 - 2.0**119


@pytest.mark.parametrize(
    ("codec", "unit_roundoff", "subnormal_error", "overflow"),
    [
        ("float16", 2.0**-11, 2.0**-25, F16_OVERFLOW),
        ("bfloat16", 2.0**-8, 2.0**-134, BF16_OVERFLOW),
    ],
    ids=["float16", "bfloat16"],
)
@settings(max_examples=150)
@given(values=st.one_of(float32_arrays(max_magnitude=70000.0), float32_arrays()))
def test_float_codec_error_bound_or_overflow_rejected(
    codec: str, unit_roundoff: float, subnormal_error: float, overflow: float, values: np.ndarray
) -> None:
    magnitudes = np.abs(values.astype(np.float64))
    if magnitudes.max(initial=0) >= overflow:
        with pytest.raises(ValueError, match=codec):
            compress(values, codec)
        return
    decoded = roundtrip(values, codec)
    bound = np.maximum(magnitudes * unit_roundoff, subnormal_error)
    assert (exact_error(decoded, values) <= bound).all()


@settings(max_examples=150)
@given(float32_arrays())
def test_int8_blockwise_absolute_error_bound(values: np.ndarray) -> None:
    decoded = roundtrip(values, "int8_blockwise")
    assert np.isfinite(decoded).all()
    flat, out = values.reshape(-1).astype(np.float64), decoded.reshape(-1)
    for start in range(0, flat.size, INT8_BLOCK_SIZE):
        block = flat[start : start + INT8_BLOCK_SIZE]
        absmax = np.abs(block).max()
        bound = absmax / 254 + absmax * 2.0**-20 + 2.0**-140
        assert (exact_error(out[start : start + INT8_BLOCK_SIZE], block) <= bound).all()


@given(float32_arrays(max_magnitude=2.0**100))
def test_bfloat16_conversion_is_round_to_nearest_even(values: np.ndarray) -> None:
    bits = float32_to_bfloat16_bits(values).reshape(-1)
    for x, got in zip(values.reshape(-1).tolist(), bits.tolist(), strict=True):
        assert got == reference_bfloat16_bits(x)


def reference_bfloat16_bits(x: float) -> int:
    """Pick the nearer of the two bfloat16 neighbours of x; ties go to the even pattern."""
    raw = int(np.array(x, np.float32).view(np.uint32))
    low = raw >> 16
    candidates = [low, low + 1]

    def value(pattern: int) -> float:
        return float(np.array(pattern << 16, np.uint32).view(np.float32))

    distances = [abs(value(c) - x) for c in candidates]
    if distances[0] == distances[1]:
        return low if low % 2 == 0 else low + 1
    return candidates[int(distances[1] < distances[0])]


def test_bfloat16_bits_roundtrip_every_pattern() -> None:
    patterns = np.arange(2**16, dtype=np.uint16)
    values = bfloat16_bits_to_float32(patterns)
    back = float32_to_bfloat16_bits(values)
    finite = ~np.isnan(values)
    assert (back[finite] == patterns[finite]).all()
    assert np.isnan(bfloat16_bits_to_float32(back[~finite])).all()


@pytest.mark.parametrize("codec", ["float16", "bfloat16"])
def test_float_codecs_carry_nan_and_infinities(codec: str) -> None:
    values = np.array([np.nan, np.inf, -np.inf, -np.nan, 1.0], dtype=np.float32)
    decoded = roundtrip(values, codec)
    assert np.isnan(decoded[[0, 3]]).all()
    assert decoded[1] == np.inf and decoded[2] == -np.inf and decoded[4] == 1.0


def test_bfloat16_keeps_nan_whose_payload_sits_in_the_low_bits() -> None:
    # A NaN whose only set mantissa bit would be truncated away must not become infinity.
    nan = np.array([0x7F800001, 0xFF800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(roundtrip(nan, "bfloat16")).all()


@pytest.mark.parametrize("big", [65520.0, -65520.0, 1e6, 3.4e38])
def test_float16_rejects_finite_overflow(big: float) -> None:
    with pytest.raises(ValueError, match="float16"):
        compress(np.array([1.0, big], dtype=np.float32), "float16")


def test_float16_keeps_values_that_round_into_range() -> None:
    values = np.array([65504.0, 65519.0, -65519.0], dtype=np.float32)
    assert roundtrip(values, "float16").tolist() == [F16_MAX, F16_MAX, -F16_MAX]


def test_bfloat16_rejects_finite_overflow() -> None:
    largest = np.finfo(np.float32).max
    with pytest.raises(ValueError, match="bfloat16"):
        compress(np.array([largest], dtype=np.float32), "bfloat16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_blockwise_rejects_nan_and_infinities(bad: float) -> None:
    values = np.zeros(200, dtype=np.float32)
    values[130] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        compress(values, "int8_blockwise")


def test_int8_blockwise_layout_scales_then_codes() -> None:
    values = np.concatenate([np.full(64, -2.0), np.arange(3.0)]).astype(np.float32)
    payload = bytes(compress(values, "int8_blockwise"))
    scales = np.frombuffer(payload[:8], "<f4")
    codes = np.frombuffer(payload[8:], np.int8)
    assert scales.tolist() == pytest.approx([2 / 127, 2 / 127])
    assert codes.tolist() == [-127] * 64 + [0, 64, 127]


def test_int8_blockwise_zero_block_and_float32_extremes() -> None:
    largest = np.finfo(np.float32).max
    values = np.array([0.0] * 64 + [largest, -largest, 1.0], dtype=np.float32)
    decoded = roundtrip(values, "int8_blockwise")
    assert (decoded[:64] == 0).all()
    assert np.isfinite(decoded).all()
    assert decoded[64] == pytest.approx(largest, rel=1e-6)


@pytest.mark.parametrize("codec", CODECS)
def test_empty_arrays(codec: str) -> None:
    empty = np.zeros((0, 3), dtype=np.float32)
    assert encoded_nbytes(codec, 0) == 0
    assert roundtrip(empty, codec).shape == (0, 3)


@pytest.mark.parametrize(
    ("codec", "numel", "size"),
    [("none", 10, 40), ("float16", 10, 20), ("bfloat16", 3, 6), ("int8_blockwise", 65, 73)],
)
def test_encoded_sizes(codec: str, numel: int, size: int) -> None:
    assert encoded_nbytes(codec, numel) == size
    assert len(compress(np.zeros(numel, np.float32), codec)) == size


def test_unknown_codec_and_wrong_payload_length() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        compress(np.zeros(3, np.float32), "zstd")
    with pytest.raises(ValueError, match="must be 6 bytes"):
        decompress(b"\0" * 5, "float16", 3)


def test_decompress_tolerates_garbage_scales() -> None:
    """A peer's NaN or huge scales give garbage values, not warnings or errors."""
    scales = np.array([np.nan, 3e38], dtype="<f4").tobytes()
    payload = scales + np.full(65, 127, dtype=np.int8).tobytes()
    with np.errstate(all="raise"):
        decoded = decompress(payload, "int8_blockwise", 65)
    assert np.isnan(decoded[:64]).all() and math.isinf(decoded[64])
