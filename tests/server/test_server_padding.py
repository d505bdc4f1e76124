"""Left padding: the session rules for ``InferenceStep.padding`` and the server skipping pad
tokens, so that every row computes exactly what it would alone, unpadded."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from distllm.errors import RemoteError
from distllm.model import SpanModel
from distllm.protocol import (
    InferenceOutput,
    InferenceStep,
    InvalidPosition,
    InvalidTensor,
    SessionParams,
    SessionState,
    SpanSession,
    SpanShape,
)
from distllm.server.tensors import from_wire, to_wire
from distllm.testing import eventually
from distllm.wire import decode_message, encode_message
from distllm.wire.tensors import WireTensor

HIDDEN = 64
TOL = {"atol": 1e-4, "rtol": 1e-4}
Serve = Callable[..., Any]
_step_ids = itertools.count()


# -- the rules (pure) --------------------------------------------------------------------------


def _pure_step(n: int, start: int | None = None, **fields: Any) -> InferenceStep:
    hidden = WireTensor.from_numpy(np.zeros((2, n, 8), np.float32))
    hypo = fields.pop("hypo_ids", None)
    hypo_ids = None if hypo is None else WireTensor.from_numpy(np.array(hypo, np.int64))
    return InferenceStep(hidden, start, hypo_ids, None, 0, **fields)


def _machine() -> SpanSession:
    return SpanSession(SessionParams(16, 2, "float32", SpanShape(2, 8)))


def test_padding_is_set_from_position_zero_and_then_fixed() -> None:
    session = _machine()
    plan = session.receive_step(_pure_step(4, padding=(0, 3)))
    assert plan.padding == (0, 3) and plan.row_padding(1) == 3
    session.complete_step(plan)
    assert session.padding == (0, 3)
    for same in (None, (0, 3)):  # later steps: unchanged or repeated
        plan = session.receive_step(_pure_step(1, padding=same))
        assert plan.padding == (0, 3)
        session.complete_step(plan)
    # a step from position 0 (a replay, or a fresh start) may set it again; zeros mean none
    plan = session.receive_step(_pure_step(2, start=0, padding=(0, 0)))
    assert plan.padding is None
    session.complete_step(plan)
    assert session.padding is None


@pytest.mark.parametrize(
    ("steps", "error", "match"),
    [
        ([_pure_step(3, padding=(1, 2)), _pure_step(1, padding=(2, 1))], InvalidPosition, "0"),
        ([_pure_step(3, padding=(1,))], InvalidPosition, "2 rows"),
        ([_pure_step(3, padding=(0, 16))], InvalidPosition, "max_length"),
        ([_pure_step(3, padding=(0, 2)), _pure_step(1, hypo_ids=[1, 1])], InvalidTensor, "padding"),
    ],
)
def test_breaking_a_padding_rule_is_the_peers_fault(
    steps: list[InferenceStep], error: type[Exception], match: str
) -> None:
    session = _machine()
    *good, bad = steps
    for message in good:
        session.complete_step(session.receive_step(message))
    with pytest.raises(error, match=match):
        session.receive_step(bad)
    assert session.state is SessionState.ERROR


def test_equal_padding_rows_may_swap_and_padding_travels() -> None:
    session = _machine()
    session.complete_step(session.receive_step(_pure_step(3, padding=(2, 2))))
    plan = session.receive_step(_pure_step(1, hypo_ids=[1, 0]))
    assert plan.hypo_ids == (1, 0) and plan.padding == (2, 2)
    message = _pure_step(1, padding=(0, 5))
    assert decode_message(b"".join(bytes(p) for p in encode_message(message))) == message
    with pytest.raises(ValueError, match="padding"):
        _pure_step(1, padding=(0, -1))
    with pytest.raises(ValueError, match="padding"):
        _pure_step(1, padding=())


# -- the server --------------------------------------------------------------------------------


async def _step(
    session: Any,
    hidden: torch.Tensor,
    *,
    start: int | None = None,
    padding: tuple[int, ...] | None = None,
    hypo_ids: list[int] | None = None,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    message = InferenceStep(
        to_wire(hidden, "float32", "none"),
        start,
        None if hypo_ids is None else WireTensor.from_numpy(np.array(hypo_ids, np.int64)),
        None if prompts is None else to_wire(prompts, "float32", "none"),
        next(_step_ids),
        padding,
    )
    session.machine.send_step(message)
    await session.stream.send(message)
    with anyio.fail_after(30):
        output = await session.stream.receive_as(InferenceOutput)
    session.machine.receive_output(output)
    return from_wire(output.hidden).float().clone()


def _alone(span: SpanModel, rows: list[torch.Tensor], prompts: torch.Tensor | None = None) -> Any:
    """Each row through the span on its own, unpadded."""
    with torch.no_grad():
        return [span(row[None], prompts)[0] for row in rows]


def _check(out: torch.Tensor, rows: list[torch.Tensor], span: SpanModel) -> None:
    """``out`` ``[B, n, h]``: the last ``n`` session positions; zeros at pad positions, and
    each row's real tokens as computed alone."""
    n = out.shape[1]
    for r, (row, expected) in enumerate(zip(rows, _alone(span, rows), strict=True)):
        real = min(n, row.shape[0])  # the row's tokens among the last n positions
        torch.testing.assert_close(out[r, n - real :], expected[-real:], **TOL)
        assert torch.count_nonzero(out[r, : n - real]) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_padded_rows_equal_unpadded_rows_alone(
    family: str, serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span(family)
    padding = (0, 3, 5)
    x = torch.randn(3, 12, HIDDEN)
    rows = [x[r, p:8] for r, p in enumerate(padding)]  # prompts of 8, 5 and 3 tokens
    async with serve(family) as harness:
        async with harness.client.session(max_length=32, batch_size=3) as session:
            out = await _step(session, x[:, :8], padding=padding)  # prefill
            _check(out, rows, span)
            for t in range(8, 10):  # decode: padding may be repeated or left out
                out = await _step(session, x[:, t : t + 1], padding=padding if t == 8 else None)
                rows = [torch.cat([row, x[r, t : t + 1]]) for r, row in enumerate(rows)]
                _check(out, rows, span)
            assert session.machine.position == 10

            # rollback to 4: row 2 (padding 5) is left with nothing, row 1 with one token
            out = await _step(session, x[:, 10:12], start=4)
            # positions 4, 5 now hold x[:, 10:12]; position 4 is still padding for row 2
            rows = [
                torch.cat([x[0, 0:4], x[0, 10:12]]),
                torch.cat([x[1, 3:4], x[1, 10:12]]),
                x[2, 11:12],
            ]
            _check(out, rows, span)

            # replay from 0 (what failover does) with the padding sent again
            history = torch.cat([x[:, :4], x[:, 10:12]], dim=1)
            out = await _step(session, history, start=0, padding=padding)
            _check(out, rows, span)
        await eventually(harness.all_free)


@pytest.mark.anyio
async def test_beams_of_padded_prompts_reorder_within_equal_padding(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span("llama")
    padding = (2, 2, 0, 0)  # two prompts, two beams each
    x = torch.randn(4, 8, HIDDEN)
    async with serve("llama") as harness, harness.client.session(batch_size=4) as session:
        await _step(session, x[:, :5], padding=padding)
        hypo = [1, 1, 3, 2]
        out = await _step(session, x[:, 5:6], hypo_ids=hypo)
        rows = [torch.cat([x[h, padding[h] : 5], x[r, 5:6]]) for r, h in enumerate(hypo)]
        _check(out, rows, span)
        # rollback into the padding and reorder in the same step
        hypo = [0, 1, 2, 2]
        out = await _step(session, x[:, 6:8], start=1, hypo_ids=hypo)
        rows = [
            x[0, 7:8],  # positions 1 (pad) and 2..: only position 2 is real
            x[1, 7:8],
            torch.cat([x[3, 0:1], x[2, 6:8]]),  # row 2 held old row 3's history
            torch.cat([x[3, 0:1], x[3, 6:8]]),
        ]
        _check(out, rows, span)


@pytest.mark.anyio
async def test_chunked_prefill_and_deep_prompts_with_padding(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span("llama")
    padding = (4, 0)
    x = torch.randn(2, 11, HIDDEN)
    prompts = torch.randn(4, 2, 3, HIDDEN)
    async with (
        serve("llama", max_batch_tokens=6, prefill_chunk_tokens=3) as harness,
        harness.client.session(batch_size=2) as session,
    ):
        out = await _step(session, x, padding=padding, prompts=prompts)
        # deep prompts cover each row's own first positions, as if it were alone
        for r, p in enumerate(padding):
            expected = _alone(span, [x[r, p:]], prompts[:, r : r + 1])[0]
            torch.testing.assert_close(out[r, p:], expected, **TOL)
            assert torch.count_nonzero(out[r, :p]) == 0
        assert harness.server.compute.step_calls >= 4


@pytest.mark.anyio
async def test_changing_padding_mid_session_ends_it_and_frees_its_pages(serve: Serve) -> None:
    x = torch.randn(2, 4, HIDDEN)
    async with serve("llama") as harness:
        async with harness.client.session(batch_size=2) as session:
            await _step(session, x[:, :3], padding=(1, 0))
            bad = InferenceStep(to_wire(x[:, 3:], "float32", "none"), None, None, None, 9, (0, 1))
            with pytest.raises(RemoteError, match=r"^InvalidPosition: "):
                await session.send_unchecked(bad)
        await eventually(harness.all_free)
