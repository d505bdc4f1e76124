"""Remote autograd: traced forward/backward and RemoteBlocks equal local autograd through the
same blocks -- with deep prompts, sub-batches, kept graphs, and servers that fail mid-backward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from client_harness import FAST, SERVER_CONFIG, Harness, swarm_client, tiny_model
from torch import nn

from distllm.client.autograd import traced_backward, traced_forward
from distllm.client.remote_blocks import RemoteBlocks
from distllm.errors import LimitExceeded
from distllm.model import load_client_parts, load_span
from distllm.protocol.span_messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
)
from distllm.wire.tensors import WireTensor

pytestmark = pytest.mark.anyio

HIDDEN = 64
BLOCKS = 4
TOL = {"atol": 1e-4, "rtol": 1e-3}


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


def local_autograd(
    path: Path, x: torch.Tensor, prompts: torch.Tensor | None, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Output, d/d(x) and d/d(prompts) of the whole model's blocks, locally."""
    span = load_span(path, 0, BLOCKS)
    leaves = [x.detach().requires_grad_(True)]
    if prompts is not None:
        leaves.append(prompts.detach().requires_grad_(True))
    with torch.enable_grad():
        out = span(leaves[0], prompts=leaves[1] if prompts is not None else None)
        grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads[0], grads[1] if prompts is not None else None


def spy(h: Harness, on_call: Callable[[Any, Any], None] | None = None) -> list[Any]:
    """Every request the client's RPC endpoint sends from now on (``on_call(request,
    response)`` after each answered one)."""
    sent: list[Any] = []
    rpc = h.model.rpc
    original = rpc.call

    async def call(address: Any, method: str, request: Any, **kwargs: Any) -> Any:
        sent.append(request)
        response = await original(address, method, request, **kwargs)
        if on_call is not None:
            on_call(request, response)
        return response

    rpc.call = call  # type: ignore[method-assign]
    return sent


def no_bans(h: Harness) -> bool:
    router = h.model.router
    return not router.banned() and all(
        router.bans.failures(s.peer_id) == 0 for s in h.swarm.servers
    )


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("keep_graph", [False, True])
async def test_traced_forward_and_backward_equal_local_autograd(
    root: Path, family: str, keep_graph: bool
):
    path = tiny_model(family, root)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, HIDDEN, generator=gen)
    prompts = torch.randn(BLOCKS, 2, 3, HIDDEN, generator=gen) * 0.5
    g = torch.randn(2, 7, HIDDEN, generator=gen)
    out, grad_x, grad_p = local_autograd(path, x, prompts, g)
    async with swarm_client(path, [(0, 1), (1, 3), (3, 4)]) as h:
        sent = spy(h)
        y, trace = await traced_forward(h.model, x, prompts, keep_graph=keep_graph)
        torch.testing.assert_close(y, out, atol=1e-4, rtol=1e-4)
        assert [(c.hop.start, c.hop.end) for c in trace.parts[0].calls] == [(0, 1), (1, 3), (3, 4)]
        grads = await traced_backward(h.model, trace, g)
        torch.testing.assert_close(grads.hidden, grad_x, **TOL)
        assert grads.prompts is not None
        torch.testing.assert_close(grads.prompts, grad_p, **TOL)
        # Each hop got its own slice of the prompts; kept graphs are named by the backward.
        forwards = [r for r in sent if isinstance(r, ForwardRequest)]
        backwards = [r for r in sent if isinstance(r, BackwardRequest)]
        assert [r.prompts.shape[0] for r in forwards] == [1, 2, 1]
        ids = [r.forward_id for r in forwards]
        if keep_graph:
            assert all(i is not None for i in ids) and len(set(ids)) == 3
        else:
            assert ids == [None, None, None]
        assert [r.forward_id for r in reversed(backwards)] == ids
        # The stateless face: the same numbers (no prompts: hidden gradient only).
        _, grad_plain, _ = local_autograd(path, x, None, g)
        plain = await h.model.backward(x, g)
        assert plain.prompts is None
        torch.testing.assert_close(plain.hidden, grad_plain, **TOL)
        await h.assert_clean()


@pytest.mark.parametrize("prompt_rows", [1, 3])
async def test_sub_batches_run_concurrently_and_give_the_same_results(root: Path, prompt_rows: int):
    path = tiny_model("llama", root)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, HIDDEN, generator=gen)
    prompts = torch.randn(BLOCKS, prompt_rows, 2, HIDDEN, generator=gen) * 0.5
    g = torch.randn(3, 5, HIDDEN, generator=gen)
    out, grad_x, grad_p = local_autograd(path, x, prompts, g)
    config = dataclasses.replace(FAST, max_forward_tokens=10)  # 2 rows of 5 tokens at most
    async with swarm_client(path, [(0, 2), (2, 4), (0, 2), (2, 4)], config=config) as h:
        y, trace = await traced_forward(h.model, x, prompts, keep_graph=True)
        assert [p.rows for p in trace.parts] == [slice(0, 2), slice(2, 3)]
        torch.testing.assert_close(y, out, atol=1e-4, rtol=1e-4)
        grads = await traced_backward(h.model, trace, g)
        torch.testing.assert_close(grads.hidden, grad_x, **TOL)
        assert grads.prompts is not None and grads.prompts.shape == prompts.shape
        torch.testing.assert_close(grads.prompts, grad_p, **TOL)


async def test_remote_blocks_train_a_local_embedding_and_prompts_under_a_worker_thread(
    root: Path,
):
    """Shallow prompt embeddings + deep prompts + a local embedding, trained through
    RemoteBlocks with ``loss.backward()`` in a worker thread: the gradients of local autograd."""
    path = tiny_model("llama", root)
    torch.manual_seed(3)
    ids = torch.randint(0, 100, (2, 6))
    prefix0 = torch.randn(1, 2, HIDDEN) * 0.1  # 2 prompt embeddings, shared by the rows
    deep0 = torch.randn(BLOCKS, 1, 4, HIDDEN) * 0.1  # deep prompts over prefix + 2 tokens

    def model_grads(blocks: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[Any]:
        embed = load_client_parts(path).embed_tokens.requires_grad_(True)
        prefix, deep = nn.Parameter(prefix0.clone()), nn.Parameter(deep0.clone())
        hidden = torch.cat([prefix.expand(2, -1, -1), embed(ids)], dim=1)
        loss = blocks(hidden, deep).square().mean()
        loss.backward()
        assert embed.weight.grad is not None
        return [loss.detach(), prefix.grad, deep.grad, embed.weight.grad]

    span = load_span(path, 0, BLOCKS)
    expected = model_grads(lambda hidden, deep: span(hidden, prompts=deep))
    async with swarm_client(path, [(0, 2), (2, 3), (3, 4)]) as h:
        sent = spy(h)
        remote = h.model.blocks()
        assert isinstance(remote, RemoteBlocks)
        got = await anyio.to_thread.run_sync(model_grads, remote)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)
        assert all(r.forward_id for r in sent if isinstance(r, ForwardRequest | BackwardRequest))
        # Without grad mode nothing is kept: no forward ids.
        sent.clear()

        def no_grad_forward() -> torch.Tensor:
            with torch.no_grad():
                return remote(torch.randn(1, 3, HIDDEN))

        out = await anyio.to_thread.run_sync(no_grad_forward)
        assert out.shape == (1, 3, HIDDEN) and not out.requires_grad
        assert [r.forward_id for r in sent] == [None] * 3


async def test_remote_blocks_with_an_explicit_call_and_outside_a_worker_thread(root: Path):
    path = tiny_model("llama", root)
    async with swarm_client(path, [(0, 4)]) as h:
        calls: list[object] = []

        def call(func: Callable[[], Any]) -> Any:
            calls.append(func)
            return anyio.from_thread.run(_run, func)

        x = torch.randn(1, 3, HIDDEN, requires_grad=True)

        def step() -> torch.Tensor:
            h.model.blocks(call=call)(x).sum().backward()
            assert x.grad is not None
            return x.grad

        grad = await anyio.to_thread.run_sync(step)
        assert len(calls) == 2  # forward, backward
        _, expected, _ = local_autograd(path, x, None, torch.ones(1, 3, HIDDEN))
        torch.testing.assert_close(grad, expected, **TOL)
        with pytest.raises(RuntimeError, match="worker thread"):
            h.model.blocks()(torch.randn(1, 3, HIDDEN))  # on the event loop's own thread


async def _run(func: Callable[[], Any]) -> Any:
    return await func()


@pytest.mark.parametrize("keep_graph", [False, True])
async def test_a_server_killed_during_backward_is_replaced_with_the_same_gradients(
    root: Path, keep_graph: bool
):
    path = tiny_model("llama", root)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, HIDDEN, generator=gen)
    prompts = torch.randn(BLOCKS, 1, 2, HIDDEN, generator=gen) * 0.5
    g = torch.randn(2, 5, HIDDEN, generator=gen)
    _, grad_x, grad_p = local_autograd(path, x, prompts, g)
    # Two servers hold [0, 2): the one the forward used dies once the backward has begun.
    async with swarm_client(path, [(0, 2), (0, 2), (2, 4)]) as h:
        _, trace = await traced_forward(h.model, x, prompts, keep_graph=keep_graph)
        first = trace.parts[0].calls[0].hop.peer
        victim = h.server_index(first)

        def kill_after_the_first_backward(request: Any, response: Any) -> None:
            if isinstance(response, BackwardResponse) and request.start == 2:
                h.swarm.kill(victim)

        sent = spy(h, kill_after_the_first_backward)
        grads = await traced_backward(h.model, trace, g)
        torch.testing.assert_close(grads.hidden, grad_x, **TOL)
        assert grads.prompts is not None
        torch.testing.assert_close(grads.prompts, grad_p, **TOL)
        assert h.model.router.bans.failures(first) == 1
        # The replacement computed [0, 2) from the recorded inputs: a forward, then a backward.
        calls = [r for r in sent if isinstance(r, ForwardRequest | BackwardRequest)]  # no probes
        kinds = [(type(r).__name__, r.start) for r in calls]
        assert kinds[-2:] == [("ForwardRequest", 0), ("BackwardRequest", 0)]


async def test_a_wrong_shaped_gradient_is_the_servers_failure(root: Path):
    path = tiny_model("llama", root)
    x = torch.randn(1, 4, HIDDEN)
    g = torch.randn(1, 4, HIDDEN)
    _, grad_x, _ = local_autograd(path, x, None, g)
    async with swarm_client(path, [(0, 4), (0, 4)]) as h:
        rpc = h.model.rpc
        original = rpc.call
        liar: list[object] = []

        async def call(address: Any, method: str, request: Any, **kwargs: Any) -> Any:
            response = await original(address, method, request, **kwargs)
            if isinstance(response, BackwardResponse) and not liar:
                liar.append(address.peer_id)
                bad = WireTensor.from_buffer(bytes(4 * HIDDEN), "float32", (1, 1, HIDDEN))
                return BackwardResponse(bad, None)
            return response

        rpc.call = call  # type: ignore[method-assign]
        grads = await h.model.backward(x, g)
        torch.testing.assert_close(grads.hidden, grad_x, **TOL)
        assert h.model.router.banned() == set(liar)


async def test_bad_inputs_raise_value_error_and_ban_nobody(root: Path):
    path = tiny_model("llama", root)
    x = torch.randn(2, 4, HIDDEN)
    prompts = torch.zeros(BLOCKS, 1, 2, HIDDEN)
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        model = h.model
        sent = spy(h)
        nan_x = x.clone()
        nan_x[1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="hidden holds NaN"):
            await model.forward(nan_x)
        inf_p = prompts.clone()
        inf_p[0, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="prompts holds NaN"):
            await model.forward(x, prompts=inf_p)
        # Finite in float64, infinite in the wire's float32: caught before sending, too.
        with pytest.raises(ValueError, match="hidden holds NaN or infinite values"):
            await model.forward(torch.full((1, 2, HIDDEN), 1e300, dtype=torch.float64))
        for bad, match in [
            (torch.randn(2, 4), "hidden must be"),
            (torch.randn(2, 0, HIDDEN), "hidden must be"),
            (torch.randn(2, 4, HIDDEN + 1), "hidden must be"),
        ]:
            with pytest.raises(ValueError, match=match):
                await model.forward(bad)
        for bad_p in [
            torch.zeros(BLOCKS - 1, 1, 2, HIDDEN),
            torch.zeros(BLOCKS, 3, 2, HIDDEN),
            torch.zeros(BLOCKS, 1, 5, HIDDEN),
        ]:
            with pytest.raises(ValueError, match="prompts must be"):
                await model.forward(x, prompts=bad_p)
        with pytest.raises(ValueError, match="adapter must be"):
            await model.forward(x, adapter="no spaces")
        assert sent == []  # nothing left the client
        _, trace = await traced_forward(model, x, prompts)
        nan_g = torch.randn(2, 4, HIDDEN)
        nan_g[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="grad_output holds NaN"):
            await traced_backward(model, trace, nan_g)
        with pytest.raises(ValueError, match="grad_output"):
            await traced_backward(model, trace, torch.randn(1, 4, HIDDEN))
        with pytest.raises(ValueError, match="grad_output"):
            await model.backward(x, torch.randn(2, 3, HIDDEN))
        assert not any(isinstance(r, BackwardRequest) for r in sent)
        assert no_bans(h)


async def test_a_server_that_forgot_a_forward_id_recomputes_and_is_not_banned(root: Path):
    """``UnknownForward`` (the server never saw the id, e.g. it restarted): asked again without
    the id, it recomputes from the inputs the backward carries anyway."""
    path = tiny_model("llama", root)
    x = torch.randn(1, 4, HIDDEN)
    g = torch.randn(1, 4, HIDDEN)
    _, grad_x, _ = local_autograd(path, x, None, g)
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        _, trace = await traced_forward(h.model, x)
        (part,) = trace.parts
        forgotten = tuple(dataclasses.replace(c, forward_id=b"never-sent") for c in part.calls)
        trace = dataclasses.replace(trace, parts=(dataclasses.replace(part, calls=forgotten),))
        sent = spy(h)
        grads = await traced_backward(h.model, trace, g)
        torch.testing.assert_close(grads.hidden, grad_x, **TOL)
        assert [r.forward_id for r in sent] == [b"never-sent", None, b"never-sent", None]
        assert no_bans(h)


async def test_a_batch_too_large_for_the_servers_is_split_until_it_fits(root: Path):
    path = tiny_model("llama", root)
    x = torch.randn(4, 8, HIDDEN)  # 32 tokens
    g = torch.randn(4, 8, HIDDEN)
    out, grad, _ = local_autograd(path, x, None, g)
    small = dataclasses.replace(SERVER_CONFIG, max_request_tokens=16)
    async with swarm_client(path, [(0, 2), (2, 4)], server_config=small) as h:
        # 32 tokens in one request: refused (LimitExceeded), halved, and the halves of 2 rows
        # (16 tokens) fit. Nobody is banned for it.
        output, trace = await traced_forward(h.model, x)
        torch.testing.assert_close(output, out, **TOL)
        assert [(p.rows.start, p.rows.stop) for p in trace.parts] == [(0, 2), (2, 4)]
        torch.testing.assert_close((await traced_backward(h.model, trace, g)).hidden, grad, **TOL)
        torch.testing.assert_close((await h.model.backward(x, g)).hidden, grad, **TOL)
        # A single row over the limit cannot be split: the servers' error, as it is.
        with pytest.raises(LimitExceeded, match="max_request_tokens"):
            await h.model.forward(torch.randn(1, 20, HIDDEN))
        assert not h.model.router.banned()
    split = dataclasses.replace(FAST, max_forward_tokens=16)
    async with swarm_client(path, [(0, 2), (2, 4)], server_config=small, config=split) as h:
        # Sub-batches of 2 rows (16 tokens) from the start: nothing is refused.
        torch.testing.assert_close(await h.model.forward(x), out, **TOL)
        torch.testing.assert_close((await h.model.backward(x, g)).hidden, grad, **TOL)
