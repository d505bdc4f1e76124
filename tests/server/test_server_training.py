"""``span.forward`` and ``span.backward`` equal the same blocks under local autograd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from distllm.model import SpanModel
from distllm.testing.models import capture_block_io

pytestmark = pytest.mark.anyio

HIDDEN = 64


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_forward_matches_transformers_blocks(
    family: str, serve: Callable[..., Any], checkpoint: Callable[[str], Path]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint(family)).eval()
    block_input, block_output = capture_block_io(model, 0, 4, torch.randint(4, 100, (2, 9)))
    async with serve(family) as harness:
        out = await harness.client.forward(block_input)
    torch.testing.assert_close(out, block_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("with_prompts", [False, True])
async def test_backward_matches_local_autograd(
    family: str,
    with_prompts: bool,
    serve: Callable[..., Any],
    local_span: Callable[[str], SpanModel],
) -> None:
    span = local_span(family)
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    prompts = torch.randn(4, 1, 3, HIDDEN, requires_grad=True) if with_prompts else None
    grad_output = torch.randn(2, 7, HIDDEN)
    out = span(x, prompts=prompts)
    out.backward(grad_output)

    async with serve(family) as harness:
        client = harness.client
        remote_out = await client.forward(x.detach(), None if prompts is None else prompts.detach())
        grad_in, grad_prompts = await client.backward(
            x.detach(), grad_output, None if prompts is None else prompts.detach()
        )
        assert harness.server.compute.stats.training_requests == 2
    torch.testing.assert_close(remote_out, out.detach(), atol=1e-4, rtol=1e-4)
    assert x.grad is not None
    torch.testing.assert_close(grad_in, x.grad, atol=1e-5, rtol=1e-3)
    if prompts is None:
        assert grad_prompts is None
    else:
        assert grad_prompts is not None and prompts.grad is not None
        torch.testing.assert_close(grad_prompts, prompts.grad, atol=1e-5, rtol=1e-3)


async def test_inference_outranks_training_and_both_complete(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    x = torch.randn(1, 10, HIDDEN)
    big = torch.randn(4, 32, HIDDEN)
    async with serve("llama", clients=2) as harness:
        results: dict[str, torch.Tensor] = {}

        async def decode() -> None:
            async with harness.clients[0].session() as session:
                outs = [await session.step(x[:, :2])]
                outs += [await session.step(x[:, t : t + 1]) for t in range(2, 10)]
            results["decode"] = torch.cat(outs, dim=1)

        async def train() -> None:
            for _ in range(3):
                results["forward"] = await harness.clients[1].forward(big)

        async with anyio.create_task_group() as tg:
            tg.start_soon(decode)
            tg.start_soon(train)
    span = local_span("llama")
    with torch.no_grad():
        torch.testing.assert_close(results["decode"], span(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(results["forward"], span(big), atol=1e-4, rtol=1e-4)
