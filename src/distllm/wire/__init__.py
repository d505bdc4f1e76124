"""L1 wire format: CBOR messages, tensors with raw payloads, compression codecs, framing. Pure."""

from __future__ import annotations

from distllm.wire.codecs import CODECS, INT8_BLOCK_SIZE, compress, decompress
from distllm.wire.framing import FRAME_HEADER, MAX_FRAME_LENGTH, FrameDecoder, encode_frame
from distllm.wire.messages import (
    MAX_NESTING_DEPTH,
    PAYLOAD_ALIGNMENT,
    PROTOCOL_VERSION,
    decode_message,
    encode_message,
    message,
    registered_types,
)
from distllm.wire.tensors import DTYPES, WireTensor, codecs_for, payload_nbytes, storage_dtype

__all__ = [
    "CODECS",
    "DTYPES",
    "FRAME_HEADER",
    "INT8_BLOCK_SIZE",
    "MAX_FRAME_LENGTH",
    "MAX_NESTING_DEPTH",
    "PAYLOAD_ALIGNMENT",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "WireTensor",
    "codecs_for",
    "compress",
    "decode_message",
    "decompress",
    "encode_frame",
    "encode_message",
    "message",
    "payload_nbytes",
    "registered_types",
    "storage_dtype",
]
