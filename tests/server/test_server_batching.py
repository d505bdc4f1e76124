"""Steps of concurrent sessions run as one batched forward, with the same results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import torch

from distllm.model import SpanModel

pytestmark = pytest.mark.anyio

HIDDEN = 64
TOL = {"atol": 1e-4, "rtol": 1e-4}


async def _run_sessions(
    harness: Any, inputs: list[torch.Tensor], prompt: int
) -> list[torch.Tensor]:
    """Each session: prefill ``prompt`` tokens, then decode the rest one token at a time."""
    results: list[torch.Tensor | None] = [None] * len(inputs)

    async def one(i: int) -> None:
        client = harness.clients[i % len(harness.clients)]
        x = inputs[i]
        async with client.session(max_length=64, batch_size=x.shape[0]) as session:
            outputs = [await session.step(x[:, :prompt])]
            for t in range(prompt, x.shape[1]):
                outputs.append(await session.step(x[:, t : t + 1]))
        results[i] = torch.cat(outputs, dim=1)

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)
    return [r for r in results if r is not None]


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_concurrent_sessions_are_batched_and_exact(
    family: str, serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    span = local_span(family)
    # different prompt lengths and batch sizes: ragged batches over different page tables
    inputs = [torch.randn(1 + i % 2, 12 + i, HIDDEN) for i in range(6)]
    prompt = 4
    steps = sum(1 + x.shape[1] - prompt for x in inputs)
    async with serve(family, clients=3) as harness:
        outputs = await _run_sessions(harness, inputs, prompt)
        stats = harness.server.compute.stats
        assert stats.inference_chunks == steps
        assert harness.server.compute.step_calls < steps / 2  # most steps shared a forward
    for x, out in zip(inputs, outputs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(out, span(x), **TOL)


async def test_one_at_a_time_scheduling_computes_the_same(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    inputs = [torch.randn(1, 8, HIDDEN) for _ in range(3)]
    async with serve("llama", clients=3, max_batch_sessions=1, batch_window=0) as harness:
        outputs = await _run_sessions(harness, inputs, 3)
        compute = harness.server.compute
        assert compute.step_calls == compute.stats.inference_chunks  # never batched
    for x, out in zip(inputs, outputs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(out, local_span("llama")(x), **TOL)
