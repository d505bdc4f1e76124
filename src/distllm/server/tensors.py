"""Wire tensors <-> torch tensors, for the compute thread.

Uncompressed payloads become torch tensors without a copy (``torch.frombuffer`` over the
received frame); outputs go back in the dtype and codec the client asked for.
"""

from __future__ import annotations

from typing import Final

import torch

from distllm.protocol.errors import InvalidTensor
from distllm.wire.tensors import WireTensor

__all__ = ["TORCH_DTYPES", "check_finite", "from_wire", "to_wire"]

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
# numpy has no bfloat16: its bytes travel as int16 bit patterns.
_NUMPY_VIEW: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.int16,
}


def from_wire(t: WireTensor) -> torch.Tensor:
    """The decoded tensor (a view of the received bytes when uncompressed)."""
    dtype = TORCH_DTYPES[t.dtype]
    if t.numel == 0:
        return torch.empty(t.shape, dtype=dtype)
    raw: bytes | bytearray | memoryview = t.decoded_bytes()
    if isinstance(raw, bytes) or (isinstance(raw, memoryview) and raw.readonly):
        raw = bytearray(raw)  # torch.frombuffer wants writable memory
    return torch.frombuffer(raw, dtype=dtype).view(t.shape)


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Reject NaN and infinities: they would poison every later block and session output."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidTensor(f"{name} holds NaN or infinite values")


def to_wire(tensor: torch.Tensor, dtype: str, compression: str) -> WireTensor:
    """``tensor`` as a wire tensor of ``dtype``, encoded with ``compression``."""
    values = tensor.detach().to(TORCH_DTYPES[dtype]).contiguous()
    # memoryview cannot cast empty multi-dimensional arrays
    raw = values.view(_NUMPY_VIEW[dtype]).numpy().data if values.numel() else b""
    return WireTensor.from_buffer(raw, dtype, tuple(values.shape), compression)
