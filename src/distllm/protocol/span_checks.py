"""Shape and dtype rules of the span protocol's tensors, checked on their descriptors (pure).

Only metadata is read (dtype, shape), except for ``hypo_ids`` whose values matter. Whether
float values are finite is checked where they are decoded (the server's compute thread).
Every function raises :class:`~distllm.protocol.errors.InvalidTensor` naming the tensor, what
was expected and what came -- except :func:`check_padding`, whose counts are positions
(:class:`~distllm.protocol.errors.InvalidPosition`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distllm.protocol.errors import InvalidPosition, InvalidTensor
from distllm.protocol.span_messages import BackwardRequest, ForwardRequest
from distllm.wire.tensors import WireTensor

__all__ = [
    "SpanShape",
    "check_backward",
    "check_forward",
    "check_hidden",
    "check_hypo_ids",
    "check_padding",
    "check_prompts",
]


@dataclass(frozen=True, slots=True)
class SpanShape:
    """What tensors sent to a span must fit."""

    num_blocks: int
    hidden_size: int


def _describe(t: WireTensor) -> str:
    return f"{t.dtype}{list(t.shape)}"


def check_hidden(
    t: WireTensor, name: str, *, dtype: str, hidden_size: int, batch: int | None = None
) -> int:
    """Hidden states ``[batch, n >= 1, hidden_size]`` of ``dtype``; returns ``n``.

    ``batch=None`` accepts any batch of at least one row.
    """
    if t.dtype != dtype:
        raise InvalidTensor(f"{name} is {_describe(t)}; expected dtype {dtype}")
    rows = "b" if batch is None else str(batch)
    if (
        len(t.shape) != 3
        or t.shape[0] < 1
        or (batch is not None and t.shape[0] != batch)
        or t.shape[1] < 1
        or t.shape[2] != hidden_size
    ):
        raise InvalidTensor(f"{name} is {_describe(t)}; expected [{rows}, n>=1, {hidden_size}]")
    return t.shape[1]


def check_prompts(
    t: WireTensor, *, dtype: str, span: SpanShape, batch: int, max_length: int
) -> int:
    """Deep prompts ``[num_blocks, batch or 1, length, hidden_size]``; returns ``length``
    (at least 1, at most ``max_length``)."""
    expected = f"[{span.num_blocks}, {batch} or 1, 1..{max_length}, {span.hidden_size}]"
    if t.dtype != dtype:
        raise InvalidTensor(f"prompts are {_describe(t)}; expected dtype {dtype}")
    if (
        len(t.shape) != 4
        or t.shape[0] != span.num_blocks
        or t.shape[1] not in (1, batch)
        or not 1 <= t.shape[2] <= max_length
        or t.shape[3] != span.hidden_size
    ):
        raise InvalidTensor(f"prompts are {_describe(t)}; expected {expected}")
    return t.shape[2]


def check_hypo_ids(t: WireTensor, batch: int) -> tuple[int, ...] | None:
    """Row order ``int64 [batch]`` with values in ``0..batch-1``; ``None`` for the identity."""
    if t.dtype != "int64" or t.shape != (batch,):
        raise InvalidTensor(f"hypo_ids is {_describe(t)}; expected int64[{batch}]")
    values = t.to_numpy()
    if int(values.min()) < 0 or int(values.max()) >= batch:  # batch >= 1: never empty
        raise InvalidTensor(f"hypo_ids must lie in 0..{batch - 1}, got {values.tolist()[:16]}")
    order = tuple(int(v) for v in values)
    return None if np.array_equal(values, np.arange(batch)) else order


def check_padding(padding: tuple[int, ...], batch: int, max_length: int) -> tuple[int, ...] | None:
    """Leading pad tokens per row: ``batch`` counts in ``0 .. max_length - 1`` (every row keeps
    room for a token); ``None`` when there is no padding at all."""
    if len(padding) != batch:
        raise InvalidPosition(f"padding has {len(padding)} counts; the session has {batch} rows")
    if max(padding) >= max_length:  # counts are >= 0 (checked on decoding)
        raise InvalidPosition(
            f"padding {max(padding)} leaves no room in the session's max_length {max_length}"
        )
    return padding if any(padding) else None


def check_forward(request: ForwardRequest, span: SpanShape) -> None:
    """The tensors of a forward request fit the span."""
    hidden = request.hidden
    check_hidden(hidden, "hidden", dtype=hidden.dtype, hidden_size=span.hidden_size)
    if request.prompts is not None:
        check_prompts(
            request.prompts,
            dtype=hidden.dtype,
            span=span,
            batch=hidden.shape[0],
            max_length=hidden.shape[1],
        )


def check_backward(request: BackwardRequest, span: SpanShape) -> None:
    """The tensors of a backward request fit the span and each other."""
    hidden, grad = request.hidden, request.grad_output
    check_hidden(hidden, "hidden", dtype=hidden.dtype, hidden_size=span.hidden_size)
    if grad.dtype != hidden.dtype or grad.shape != hidden.shape:
        raise InvalidTensor(f"grad_output is {_describe(grad)}; expected {_describe(hidden)}")
    if request.prompts is not None:
        check_prompts(
            request.prompts,
            dtype=hidden.dtype,
            span=span,
            batch=hidden.shape[0],
            max_length=hidden.shape[1],
        )
