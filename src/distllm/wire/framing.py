"""Length-prefixed frames on a byte stream (pure, sans-IO).

A frame is ``u32 body_length (big-endian) | body``. :class:`FrameDecoder` copies every received
byte exactly once: straight into a buffer allocated for its frame's body as soon as the length
is known, so a 64 MiB tensor is never re-concatenated, whatever the chunking of the stream.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Final

import numpy as np

from distllm.errors import LimitExceeded, RemoteProtocolError

__all__ = ["FRAME_HEADER", "MAX_FRAME_LENGTH", "FrameDecoder", "encode_frame"]

FRAME_HEADER: Final = struct.Struct(">I")
#: The largest body a u32 length prefix can describe.
MAX_FRAME_LENGTH: Final = 2**32 - 1
# Bodies at least this large get uninitialised numpy memory: no zero-filling, and pages are only
# committed as the peer's bytes actually arrive.
_LARGE_BODY: Final = 64 * 1024
# A first part this small is merged with the length prefix (one fewer write for small frames).
_MERGE_PREFIX: Final = 4096


def encode_frame(
    parts: Sequence[bytes | memoryview], max_frame_bytes: int
) -> list[bytes | memoryview]:
    """The length prefix followed by ``parts`` (not copied, except a small first part).

    Raises ``LimitExceeded`` if the body is larger than ``max_frame_bytes`` (or than a u32).
    """
    size = sum(memoryview(part).nbytes for part in parts)
    if size > min(max_frame_bytes, MAX_FRAME_LENGTH):
        raise LimitExceeded(f"frame body of {size} bytes exceeds max_frame_bytes {max_frame_bytes}")
    prefix = FRAME_HEADER.pack(size)
    if parts and memoryview(parts[0]).nbytes <= _MERGE_PREFIX:
        return [b"".join((prefix, parts[0])), *parts[1:]]
    return [prefix, *parts]


class FrameDecoder:
    """Splits a received byte stream into frame bodies.

    ``feed`` bytes as they arrive, then call ``next_frame`` until it returns ``None``. A declared
    length above ``max_frame_bytes`` breaks the decoder: ``next_frame`` raises
    ``RemoteProtocolError`` once the frames before it are taken, and so does every later call.
    """

    __slots__ = ("_body", "_buffered", "_error", "_filled", "_frames", "_max", "_prefix")

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes < 0:
            raise ValueError(f"max_frame_bytes must be >= 0, got {max_frame_bytes!r}")
        self._max = min(max_frame_bytes, MAX_FRAME_LENGTH)
        self._prefix = bytearray()  # a length prefix split across chunks (< 4 bytes)
        self._body: memoryview | None = None  # the body being filled, if its length is known
        self._filled = 0  # bytes of _body received so far
        self._frames: deque[memoryview] = deque()  # complete bodies not yet taken
        self._buffered = 0  # bytes fed and not yet returned (prefixes included)
        self._error: str | None = None  # set once the stream is broken

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet returned by :meth:`next_frame` (length prefixes included)."""
        return self._buffered

    def at_boundary(self) -> bool:
        """True when no partial frame is pending: an end of stream here is clean."""
        return self._error is None and not self._prefix and self._body is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream. Raises ``RemoteProtocolError`` if the decoder
        is already broken."""
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pos, end = 0, len(view)
        while pos < end and self._error is None:
            if self._body is not None:
                pos = self._fill_body(self._body, view, pos)
            elif not self._prefix and end - pos >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(view, pos)
                self._buffered += FRAME_HEADER.size
                pos += FRAME_HEADER.size
                self._start_body(length)
            else:
                pos = self._read_split_prefix(view, pos)

    def next_frame(self) -> memoryview | None:
        """The next complete frame body, or ``None``. The memoryview owns its own buffer
        (writable unless empty); tensors decoded from it are views of that buffer."""
        if self._frames:
            body = self._frames.popleft()
            self._buffered -= FRAME_HEADER.size + len(body)
            return body
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        return None

    def _read_split_prefix(self, view: memoryview, pos: int) -> int:
        taken = view[pos : pos + FRAME_HEADER.size - len(self._prefix)]
        self._prefix += taken
        self._buffered += len(taken)
        if len(self._prefix) == FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack(self._prefix)
            self._prefix.clear()
            self._start_body(length)
        return pos + len(taken)

    def _start_body(self, length: int) -> None:
        if length > self._max:
            self._error = f"peer announced a frame of {length} bytes; the limit is {self._max}"
            return
        if length == 0:
            self._frames.append(memoryview(b""))
            return
        if length >= _LARGE_BODY:
            self._body = np.empty(length, dtype=np.uint8).data
        else:
            self._body = memoryview(bytearray(length))
        self._filled = 0

    def _fill_body(self, body: memoryview, view: memoryview, pos: int) -> int:
        count = min(len(body) - self._filled, len(view) - pos)
        body[self._filled : self._filled + count] = view[pos : pos + count]
        self._filled += count
        self._buffered += count
        if self._filled == len(body):
            self._frames.append(body)
            self._body = None
        return pos + count
