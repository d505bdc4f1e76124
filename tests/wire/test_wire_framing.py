"""Framing: chunking invariance, limits, boundary and buffering bookkeeping."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.errors import LimitExceeded, RemoteProtocolError
from distllm.wire.framing import FRAME_HEADER, FrameDecoder, encode_frame

LIMIT = 1 << 20


def stream_of(bodies: list[bytes]) -> bytes:
    return b"".join(b"".join(encode_frame([body], LIMIT)) for body in bodies)


def boundaries(bodies: list[bytes]) -> set[int]:
    """Stream offsets at which no frame is partially received."""
    offsets, position = {0}, 0
    for body in bodies:
        position += FRAME_HEADER.size + len(body)
        offsets.add(position)
    return offsets


def take(decoder: FrameDecoder) -> bytes | None:
    frame = decoder.next_frame()
    return None if frame is None else bytes(frame)


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(bytes(frame))
    return frames


@settings(max_examples=200)
@given(
    bodies=st.lists(st.binary(max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_same_frames_however_the_stream_is_split(bodies: list[bytes], cuts: list[int]) -> None:
    stream = stream_of(bodies)
    points = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    decoder, received, clean = FrameDecoder(LIMIT), [], boundaries(bodies)
    for start, end in itertools.pairwise(points):
        decoder.feed(stream[start:end])
        assert decoder.at_boundary() == (end in clean)
        before = decoder.buffered_bytes
        taken = drain(decoder)
        received += taken
        assert before - decoder.buffered_bytes == sum(FRAME_HEADER.size + len(b) for b in taken)
    assert received == bodies
    assert decoder.at_boundary() and decoder.buffered_bytes == 0


@settings(max_examples=25)
@given(size=st.integers(64 * 1024, 300 * 1024), cuts=st.lists(st.integers(0, 310 * 1024)))
def test_large_frames_across_arbitrary_chunks(size: int, cuts: list[int]) -> None:
    bodies = [bytes(range(256)) * (size // 256) + b"tail", b"", b"small"]
    stream = stream_of(bodies)
    points = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    decoder = FrameDecoder(LIMIT)
    received: list[bytes] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(memoryview(stream)[start:end])
        received += drain(decoder)
    assert received == bodies


def test_frames_are_independent_writable_buffers() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.feed(stream_of([b"abc", b"de"]))
    first, second = decoder.next_frame(), decoder.next_frame()
    assert first is not None and second is not None
    first[0] = ord("x")
    assert bytes(first) == b"xbc" and bytes(second) == b"de"


def test_bytes_are_taken_from_the_callers_buffer_at_feed_time() -> None:
    chunk = bytearray(stream_of([b"hello"]))
    decoder = FrameDecoder(LIMIT)
    decoder.feed(chunk)
    chunk[:] = bytes(len(chunk))  # the transport reuses its receive buffer
    assert take(decoder) == b"hello"


def test_oversized_declared_length_breaks_the_decoder() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(stream_of([b"ok"]) + FRAME_HEADER.pack(1025) + b"junk")
    assert take(decoder) == b"ok"  # frames before the bad one are still delivered
    with pytest.raises(RemoteProtocolError, match="1025"):
        decoder.next_frame()
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"more")
    assert not decoder.at_boundary()


def test_oversized_length_split_across_chunks() -> None:
    decoder = FrameDecoder(1024)
    header = FRAME_HEADER.pack(2**32 - 1)
    decoder.feed(header[:2])
    assert decoder.next_frame() is None and not decoder.at_boundary()
    decoder.feed(header[2:])
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_limit_is_inclusive_and_empty_frames_are_frames() -> None:
    decoder = FrameDecoder(5)
    decoder.feed(stream_of([b"12345", b""]))
    assert drain(decoder) == [b"12345", b""]


def test_at_boundary_and_buffered_bytes_for_a_partial_frame() -> None:
    decoder = FrameDecoder(LIMIT)
    assert decoder.at_boundary() and decoder.buffered_bytes == 0
    stream = stream_of([b"abcdef"])
    decoder.feed(stream[:3])
    assert not decoder.at_boundary() and decoder.buffered_bytes == 3
    decoder.feed(stream[3:7])
    assert not decoder.at_boundary() and decoder.buffered_bytes == 7
    assert decoder.next_frame() is None
    decoder.feed(stream[7:])
    assert decoder.at_boundary() and decoder.buffered_bytes == 10
    assert take(decoder) == b"abcdef"
    assert decoder.buffered_bytes == 0


def test_encode_frame_prefix_and_zero_copy_of_large_parts() -> None:
    big = memoryview(bytes(10_000))
    parts = encode_frame([b"head", big], 20_000)
    assert parts[0] == FRAME_HEADER.pack(10_004) + b"head"
    assert parts[1] is big
    large_first = encode_frame([big], 20_000)
    assert large_first[0] == FRAME_HEADER.pack(10_000) and large_first[1] is big
    assert encode_frame([], 10) == [FRAME_HEADER.pack(0)]


def test_encode_frame_refuses_oversized_bodies() -> None:
    with pytest.raises(LimitExceeded, match="max_frame_bytes"):
        encode_frame([b"x" * 600, b"y" * 500], 1024)
    assert len(b"".join(encode_frame([b"x" * 1024], 1024))) == 1028


def test_negative_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameDecoder(-1)
