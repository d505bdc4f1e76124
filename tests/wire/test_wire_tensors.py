"""WireTensor: construction invariants, dtype handling (bfloat16 as bits), zero-copy paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distllm.wire.codecs import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from distllm.wire.tensors import DTYPES, WireTensor, codecs_for, payload_nbytes, storage_dtype

ALL_PAIRS = [(dtype, codec) for dtype in DTYPES for codec in codecs_for(dtype)]


def sample(dtype: str, shape: tuple[int, ...] = (3, 70)) -> np.ndarray:
    """Values of ``dtype`` in its storage dtype (bfloat16 as bits)."""
    base = np.linspace(-4, 4, num=int(np.prod(shape))).reshape(shape)
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(base.astype(np.float32))
    if dtype == "bool":
        return base > 0
    if dtype == "uint8":
        return (base * 10 + 50).astype(np.uint8)
    return base.astype(storage_dtype(dtype))


def as_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(values).astype(np.float64)
    return values.astype(np.float64)


@pytest.mark.parametrize(("dtype", "codec"), ALL_PAIRS)
def test_every_dtype_and_codec_roundtrips(dtype: str, codec: str) -> None:
    values = sample(dtype)
    tensor = WireTensor.from_numpy(values, codec, dtype=dtype)
    assert (tensor.dtype, tensor.shape, tensor.compression) == (dtype, (3, 70), codec)
    assert len(tensor.data) == payload_nbytes(dtype, (3, 70), codec)
    decoded = tensor.to_numpy()
    assert decoded.dtype == storage_dtype(dtype) and decoded.shape == values.shape
    tolerance = {"none": 0, "float16": 4 * 2**-11, "bfloat16": 4 * 2**-8}.get(codec, 4 / 254)
    if codec == dtype:
        tolerance = 0
    if dtype == "bfloat16" and codec == "int8_blockwise":
        tolerance += 4 * 2**-8  # decoded values are rounded to bfloat16 again
    error = np.abs(as_float64(decoded, dtype) - as_float64(values, dtype)).max()
    assert error <= tolerance
    raw = tensor.decoded_bytes()
    assert len(raw) == tensor.nbytes == values.size * storage_dtype(dtype).itemsize
    assert bytes(raw) == decoded.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncompressed_is_zero_copy_both_ways(dtype: str) -> None:
    values = sample(dtype)
    tensor = WireTensor.from_numpy(values, dtype=dtype)
    assert np.shares_memory(np.frombuffer(tensor.data, np.uint8), values)
    assert np.shares_memory(tensor.to_numpy(), values)
    assert tensor.decoded_bytes() is tensor.data


def test_from_buffer_wraps_raw_bytes_without_copy() -> None:
    raw = bytearray(float32_to_bfloat16_bits(np.arange(6, dtype=np.float32)).tobytes())
    tensor = WireTensor.from_buffer(raw, "bfloat16", [2, 3])
    assert tensor.shape == (2, 3)
    assert np.shares_memory(tensor.to_numpy(), np.frombuffer(raw, np.uint8))
    squeezed = WireTensor.from_buffer(raw, "bfloat16", (2, 3), "int8_blockwise")
    back = bfloat16_bits_to_float32(squeezed.to_numpy())
    assert np.allclose(back, np.arange(6).reshape(2, 3), atol=5 / 254 + 0.05)
    with pytest.raises(ValueError, match="12 bytes"):
        WireTensor.from_buffer(raw[:-1], "bfloat16", (2, 3))


def test_bfloat16_from_floats_and_bits() -> None:
    floats = np.array([1.0, 1.00390625, -3.5], dtype=np.float64)  # 1 + 2**-8 ties to even
    tensor = WireTensor.from_numpy(floats, dtype="bfloat16")
    assert tensor.to_numpy().tolist() == [0x3F80, 0x3F80, 0xC060]
    assert WireTensor.from_numpy(tensor.to_numpy(), dtype="bfloat16") == tensor
    with pytest.raises(TypeError, match="bfloat16"):
        WireTensor.from_numpy(np.array([1, 2], dtype=np.int32), dtype="bfloat16")


def test_float32_to_bfloat16_codec_halves_the_bytes() -> None:
    values = np.linspace(-1, 1, 100, dtype=np.float32)
    tensor = WireTensor.from_numpy(values, "bfloat16")
    assert len(tensor.data) == 200 and tensor.nbytes == 400
    assert len(tensor.decoded_bytes()) == 400


def test_inference_and_explicit_conversion() -> None:
    assert WireTensor.from_numpy(np.zeros(2, np.int64)).dtype == "int64"
    assert WireTensor.from_numpy(np.zeros(2, ">f4")).to_numpy().tolist() == [0.0, 0.0]
    assert WireTensor.from_numpy(np.arange(3.0), dtype="float32").to_numpy().dtype == np.float32
    assert WireTensor.from_numpy(np.float32(2.5)).shape == ()
    with pytest.raises(TypeError, match="dtype="):
        WireTensor.from_numpy(np.zeros(2, np.float64))
    with pytest.raises(TypeError, match="bfloat16"):
        WireTensor.from_numpy(np.zeros(2, np.uint16))
    with pytest.raises(TypeError, match="cannot send"):
        WireTensor.from_numpy(np.zeros(2, np.float32), dtype="int64")


def test_non_contiguous_input_is_copied_in_c_order() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4).T
    tensor = WireTensor.from_numpy(values)
    assert tensor.shape == (4, 3)
    assert (tensor.to_numpy() == values).all()


@pytest.mark.parametrize(
    ("dtype", "codec"),
    [("int64", "float16"), ("bool", "int8_blockwise"), ("float16", "bfloat16"), ("x", "none")],
)
def test_disallowed_dtype_or_codec(dtype: str, codec: str) -> None:
    with pytest.raises(ValueError, match=r"not allowed|unknown dtype"):
        WireTensor(dtype, (1,), codec, b"\0" * 8)


@pytest.mark.parametrize(
    ("shape", "error"),
    [([2], TypeError), ((-1,), ValueError), ((True,), ValueError), ((2**32,), ValueError)],
)
def test_invalid_shapes(shape: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        WireTensor("uint8", shape, "none", b"")  # type: ignore[arg-type]


def test_payload_length_must_match() -> None:
    with pytest.raises(ValueError, match="must be 8 bytes"):
        WireTensor("float32", (2,), "none", b"\0" * 7)
    with pytest.raises(TypeError, match="bytes or memoryview"):
        WireTensor("uint8", (1,), "none", bytearray(1))  # type: ignore[arg-type]


def test_memoryview_data_is_flattened_to_bytes() -> None:
    values = np.zeros((2, 2), np.float32)
    tensor = WireTensor("float32", (2, 2), "none", values.data)
    assert isinstance(tensor.data, memoryview)
    assert tensor.data.format == "B" and len(tensor.data) == 16


@given(
    dtype=st.sampled_from([d for d in DTYPES if d != "bfloat16"]),
    data=st.data(),
)
def test_uncompressed_roundtrip_is_bit_exact(dtype: str, data: st.DataObject) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    values = data.draw(hnp.arrays(storage_dtype(dtype), shape))
    decoded = WireTensor.from_numpy(values).to_numpy()
    assert decoded.shape == values.shape and decoded.tobytes() == values.tobytes()
