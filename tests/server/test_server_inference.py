"""Inference through the span RPC equals the same blocks run over the whole sequence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from distllm.model import SpanModel
from distllm.testing import eventually

pytestmark = pytest.mark.anyio

HIDDEN = 64
Serve = Callable[..., Any]

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_steps_rollback_replay_and_beam_reorder(
    family: str, serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span(family)
    rows = 3
    x = torch.randn(rows, 16, HIDDEN)

    def reference(history: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return span(history)

    async with serve(family) as harness:
        async with harness.client.session(max_length=32, batch_size=rows) as session:
            outputs = [await session.step(x[:, :5])]  # prefill
            outputs += [await session.step(x[:, t : t + 1]) for t in range(5, 8)]  # decode
            history = x[:, :8]
            torch.testing.assert_close(torch.cat(outputs, dim=1), reference(history), **TOL)

            # beam search: row 0 continues old row 2, rows 1 and 2 continue old row 0
            hypo_ids = torch.tensor([2, 0, 0])
            out = await session.step(x[:, 8:9], hypo_ids=hypo_ids)
            history = torch.cat([history[hypo_ids], x[:, 8:9]], dim=1)
            torch.testing.assert_close(out, reference(history)[:, -1:], **TOL)
            out = await session.step(x[:, 9:10])
            history = torch.cat([history, x[:, 9:10]], dim=1)
            torch.testing.assert_close(out, reference(history)[:, -1:], **TOL)

            # rollback: forget positions 6.. and continue from there with two new tokens
            out = await session.step(x[:, 10:12], start=6)
            history = torch.cat([history[:, :6], x[:, 10:12]], dim=1)
            torch.testing.assert_close(out, reference(history)[:, 6:], **TOL)
            assert session.machine.position == 8

            # rollback and reorder in one step
            hypo_ids = torch.tensor([1, 1, 2])
            out = await session.step(x[:, 12:13], start=7, hypo_ids=hypo_ids)
            history = torch.cat([history[hypo_ids, :7], x[:, 12:13]], dim=1)
            torch.testing.assert_close(out, reference(history)[:, 7:], **TOL)

            # replay (what failover does): the whole history again from position 0
            out = await session.step(history, start=0)
            torch.testing.assert_close(out, reference(history), **TOL)
        await eventually(harness.all_free)


async def test_long_prefill_is_chunked_and_still_exact(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    x = torch.randn(2, 11, HIDDEN)
    async with (
        serve("llama", max_batch_tokens=8, prefill_chunk_tokens=5) as harness,
        harness.client.session(batch_size=2) as session,
    ):
        out = await session.step(x)
        with torch.no_grad():
            torch.testing.assert_close(out, local_span("llama")(x), **TOL)
        # 22 positions in chunks of at most 5: several span.step calls for one step
        assert harness.server.compute.step_calls >= 5


async def test_deep_prompts_in_inference_match_forward(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span("llama")
    x = torch.randn(2, 7, HIDDEN)
    prompts = torch.randn(4, 2, 3, HIDDEN)
    async with serve("llama") as harness, harness.client.session(batch_size=2) as session:
        # the prompts cover positions 0..2: split across the first two steps
        outputs = [await session.step(x[:, :2], prompts=prompts)]
        outputs += [await session.step(x[:, t : t + 1], prompts=prompts) for t in range(2, 7)]
        with torch.no_grad():
            expected = span(x, prompts=prompts)
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, **TOL)


async def test_bfloat16_activations_and_compressed_outputs(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    x = torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        expected = local_span("llama")(x)
    async with serve("llama") as harness:
        client = harness.client
        async with client.session(dtype="bfloat16") as session:
            assert session.opened.compression == "none"
            out = await session.step(x.bfloat16())
            torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)
        async with client.session(compression="int8_blockwise") as session:
            assert session.opened.compression == "int8_blockwise"
            out = await session.step(x)
            torch.testing.assert_close(out, expected, atol=0.05, rtol=0.02)


async def test_output_tail_returns_only_the_last_outputs(
    serve: Serve, local_span: Callable[[str], SpanModel]
) -> None:
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        expected = local_span("llama")(x)
    async with serve("llama") as harness:
        async with harness.client.session(max_length=16, batch_size=2) as session:
            # a replay that only rebuilds the cache: nothing comes back
            out = await session.step(x[:, :6], output_tail=0)
            assert out.shape == (2, 0, HIDDEN)
            assert session.machine.position == 6
            out = await session.step(x[:, 6:9], output_tail=2)
            torch.testing.assert_close(out, expected[:, 7:9], **TOL)
            out = await session.step(x[:, :9], start=0, output_tail=50)  # more than there are
            torch.testing.assert_close(out, expected, **TOL)
        await eventually(harness.all_free)
