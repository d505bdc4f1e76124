"""torch tensors <-> wire tensors, on the client side.

Uncompressed payloads go out as views of the tensor's memory and come back as views of the
received frame: a hidden state is copied neither way.
"""

from __future__ import annotations

from typing import Final

import torch

from distllm.wire.tensors import WireTensor

__all__ = ["TORCH_DTYPES", "checked_prompts", "finite", "from_wire", "ids_to_wire", "to_wire"]

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
# numpy has no bfloat16: those bytes are handed over as int16 bit patterns.
_BITS: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.int16,
    "int64": torch.int64,
}


def to_wire(tensor: torch.Tensor, dtype: str, compression: str = "none") -> WireTensor:
    """``tensor`` converted to ``dtype`` and encoded with ``compression``. Uncompressed, the
    payload is a view: do not modify ``tensor`` until the message is sent."""
    values = tensor.detach().to(device="cpu", dtype=TORCH_DTYPES[dtype]).contiguous()
    raw = values.view(_BITS[dtype]).numpy().data if values.numel() else b""
    return WireTensor.from_buffer(raw, dtype, tuple(values.shape), compression)


def finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t``, unless it holds NaN or infinities (``ValueError``: the caller's bad input is no
    server's fault, and is refused before anything is sent)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinite values (as {t.dtype})")
    return t


def checked_prompts(
    prompts: torch.Tensor,
    *,
    num_blocks: int,
    batch: int,
    max_length: int,
    hidden_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Deep prompts ``[num_blocks, batch or 1, 1..max_length, hidden_size]``, checked (shape,
    finite values) and copied to the CPU in ``dtype``."""
    if (
        prompts.dim() != 4
        or (prompts.shape[0], prompts.shape[3]) != (num_blocks, hidden_size)
        or prompts.shape[1] not in (1, batch)
        or not 1 <= prompts.shape[2] <= max_length
    ):
        raise ValueError(
            f"prompts must be [{num_blocks}, {batch} or 1, 1..{max_length}, {hidden_size}] "
            f"(blocks, rows, prompt length, hidden), got {list(prompts.shape)}"
        )
    copy = prompts.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    return finite(copy, "prompts")


def ids_to_wire(ids: torch.Tensor) -> WireTensor:
    """An integer tensor (token ids, ``hypo_ids``) as int64."""
    return to_wire(ids, "int64")


def from_wire(wire: WireTensor) -> torch.Tensor:
    """The decoded tensor, a view of the received bytes when uncompressed."""
    dtype = TORCH_DTYPES[wire.dtype]
    if wire.numel == 0:
        return torch.empty(wire.shape, dtype=dtype)
    raw: bytes | bytearray | memoryview = wire.decoded_bytes()
    if isinstance(raw, bytes) or (isinstance(raw, memoryview) and raw.readonly):
        raw = bytearray(raw)  # torch.frombuffer wants writable memory
    return torch.frombuffer(raw, dtype=dtype).view(wire.shape)
