"""Forward and backward through the swarm equal local autograd over the same blocks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from client_harness import FAST, Harness, swarm_client, tiny_model

from distllm.client import NoRouteError, RouteFailedError
from distllm.model import load_span

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


def local_reference(path: Path, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    span = load_span(path, 0, 4)
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = span(leaf)
        (grad,) = torch.autograd.grad(out, leaf, g)
    return out.detach(), grad


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_forward_and_backward_equal_local_autograd(root: Path, family: str):
    path = tiny_model(family, root)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=generator)
    g = torch.randn(2, 7, 64, generator=generator)
    out, grad = local_reference(path, x, g)
    async with swarm_client(path, [(0, 1), (1, 3), (3, 4)]) as h:
        torch.testing.assert_close(await h.model.forward(x), out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            (await h.model.backward(x, g)).hidden, grad, atol=1e-4, rtol=1e-3
        )
        await h.assert_clean()


async def test_forward_fails_over_and_steps_back_to_chain_whole_spans(root: Path):
    path = tiny_model("llama", root)
    x = torch.randn(1, 5, 64)
    g = torch.randn(1, 5, 64)
    out, grad = local_reference(path, x, g)
    config = dataclasses.replace(FAST, step_timeout=0.5, failover_timeout=1.0)
    async with swarm_client(path, [(0, 2), (2, 4), (0, 4)], config=config) as h:
        _, second, whole = (s.peer_id for s in h.swarm.servers)
        # [2, 4) fails: after [0, 2) only [0, 4) could go on, and it does not chain from
        # block 2 -- the forward steps back to block 0 and takes [0, 4).
        router = h.model.router
        seed = next(s for s in range(100) if _draws_two_hops(router, s))
        router.rng.seed(seed)
        fail_next(h, second, "ForwardRequest")
        torch.testing.assert_close(await h.model.forward(x), out, atol=1e-4, rtol=1e-4)
        assert router.bans.failures(second) == 1
        torch.testing.assert_close(
            (await h.model.backward(x, g)).hidden, grad, atol=1e-4, rtol=1e-3
        )
        # Nobody left for the last blocks: a clear error, in bounded time.
        h.black_hole(second)
        h.black_hole(whole)
        began = anyio.current_time()
        with pytest.raises((RouteFailedError, NoRouteError)) as caught:
            await h.model.forward(x)
        assert anyio.current_time() - began < config.step_timeout + config.failover_timeout + 0.3
        assert "llama" in str(caught.value)


def _draws_two_hops(router: Any, seed: int) -> bool:
    router.rng.seed(seed)
    route = router.try_plan_forward(0, 4, num_tokens=5)
    return route is not None and len(route) == 2


async def test_backward_replaces_a_server_that_fails(root: Path):
    path = tiny_model("llama", root)
    x = torch.randn(1, 5, 64)
    g = torch.randn(1, 5, 64)
    _, grad = local_reference(path, x, g)
    async with swarm_client(path, [(0, 2), (2, 4), (2, 4)]) as h:
        failed: list[object] = []
        for server in h.swarm.servers[1:]:
            fail_next(h, server.peer_id, "BackwardRequest", failed)
        torch.testing.assert_close(
            (await h.model.backward(x, g)).hidden, grad, atol=1e-4, rtol=1e-3
        )
        assert len(failed) == 1 and h.model.router.banned() == set(failed)


def fail_next(h: Harness, peer: object, request_type: str, failed: list[object] | None = None):
    """``peer`` fails the next request of ``request_type`` (and only the first of all the
    peers patched with the same ``failed`` list)."""
    failed = [] if failed is None else failed
    compute = h.swarm.servers[h.server_index(peer)].server.compute
    original = compute.train

    async def train(request: Any, *args: Any) -> Any:
        if type(request).__name__ == request_type and not failed:
            failed.append(peer)
            raise RuntimeError("injected")
        return await original(request, *args)

    compute.train = train  # type: ignore[method-assign]
