"""Kept forward graphs (``forward_id``): a backward that reuses one computes exactly what the
recomputing backward does; the store keeps to its byte budget and time to live, refuses ids a
caller never used, and never lends one caller's graph to another."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distllm.errors import RemoteError
from distllm.protocol.errors import UnknownForward
from distllm.server.graphs import GraphStore, KeptGraph, record_graph, storage_keys
from distllm.server.tensors import to_wire
from distllm.testing import eventually
from distllm.testing.models import make_tiny_lora

HIDDEN = 64
BLOCKS = 4
MODEL = "tiny-test-model"
EXACT = {"atol": 1e-6, "rtol": 1e-6}


def remote(type_name: str) -> Any:
    return pytest.raises(RemoteError, match=f"^{type_name}: ")


# -- against the recomputing backward ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_a_kept_graph_gives_the_recomputed_gradients(
    family: str,
    serve: Callable[..., Any],
    checkpoint: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    lora = make_tiny_lora(checkpoint(family), tmp_path / "lora", seed=3)
    x = torch.randn(2, 6, HIDDEN)
    prompts = torch.randn(BLOCKS, 1, 2, HIDDEN)
    grad_output = torch.randn(2, 6, HIDDEN)
    async with serve(family, adapters=(("a", lora),)) as harness:
        client, graphs = harness.client, harness.server.backend.graphs
        assert graphs is not None
        for adapter in (None, "a"):
            for p in (None, prompts):
                plain = await client.forward(x, p, adapter=adapter)
                kept = await client.forward(x, p, forward_id=b"f1", adapter=adapter)
                assert len(graphs) == 1 and graphs.bytes > x.numel() * 4 * BLOCKS
                torch.testing.assert_close(kept, plain, atol=1e-5, rtol=1e-5)
                reused = await client.backward(x, grad_output, p, forward_id=b"f1", adapter=adapter)
                assert len(graphs) == 0 and graphs.bytes == 0  # taken
                recomputed = await client.backward(x, grad_output, p, adapter=adapter)
                torch.testing.assert_close(reused[0], recomputed[0], **EXACT)
                if p is None:
                    assert reused[1] is None and recomputed[1] is None
                else:
                    assert reused[1] is not None and recomputed[1] is not None
                    torch.testing.assert_close(reused[1], recomputed[1], **EXACT)
                # seen but no longer kept: recomputed, the same again
                again = await client.backward(x, grad_output, p, forward_id=b"f1", adapter=adapter)
                torch.testing.assert_close(again[0], recomputed[0], **EXACT)


@pytest.mark.anyio
async def test_forward_ids_belong_to_their_caller(serve: Callable[..., Any]) -> None:
    x, grad = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, HIDDEN)
    async with serve("llama", clients=2) as harness:
        alice, bob = harness.clients
        with remote("UnknownForward"):
            await alice.backward(x, grad, forward_id=b"never")
        await alice.forward(x, forward_id=b"mine")
        with remote("UnknownForward"):  # bob cannot take (nor learn of) alice's graph
            await bob.backward(x, grad, forward_id=b"mine")
        graphs = harness.server.backend.graphs
        assert graphs is not None and len(graphs) == 1
        reused, _ = await alice.backward(x, grad, forward_id=b"mine")
        recomputed, _ = await alice.backward(x, grad)
        torch.testing.assert_close(reused, recomputed, **EXACT)


@pytest.mark.anyio
async def test_the_graphs_of_a_caller_that_left_are_dropped(serve: Callable[..., Any]) -> None:
    x = torch.randn(1, 4, HIDDEN)
    async with serve("llama", clients=2) as harness:
        alice, bob = harness.clients
        graphs = harness.server.backend.graphs
        await alice.forward(x, forward_id=b"a")
        await bob.forward(x, forward_id=b"b")
        assert graphs is not None and len(graphs) == 2  # kept for 60 s (the default TTL)
        server = harness.endpoints[0].peer_id
        await harness.endpoints[1].transport.disconnect(server)  # alice leaves
        # within the owner check interval (1 s) plus a thread call; bob's graph stays
        await eventually(lambda: len(graphs) == 1, within=5.0)
        assert graphs.callers() == {harness.endpoints[2].peer_id}
        await bob.backward(x, torch.randn(1, 4, HIDDEN), forward_id=b"b")
        assert len(graphs) == 0


@pytest.mark.anyio
async def test_a_backward_unlike_its_forward_is_refused(
    serve: Callable[..., Any], checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    lora = make_tiny_lora(checkpoint("llama"), tmp_path / "lora")
    x, grad = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, HIDDEN)
    async with serve("llama", adapters=(("a", lora),)) as harness:
        client = harness.client
        cases: list[dict[str, Any]] = [
            {"hidden": torch.randn(1, 5, HIDDEN), "grad_output": torch.randn(1, 5, HIDDEN)},
            {"prompts": torch.randn(BLOCKS, 1, 2, HIDDEN)},
            {"adapter": "a"},
        ]
        for case in cases:
            await client.forward(x, forward_id=b"f")
            args = {"hidden": x, "grad_output": grad, **case}
            with remote("InvalidTensor"):
                await client.backward(forward_id=b"f", **args)


@pytest.mark.anyio
async def test_grad_output_is_checked_with_a_kept_graph(serve: Callable[..., Any]) -> None:
    x = torch.randn(1, 4, HIDDEN)
    nan = torch.randn(1, 4, HIDDEN)
    nan[0, 2, 3] = float("nan")
    inf = torch.randn(1, 4, HIDDEN)
    inf[0, 0, 0] = float("-inf")
    cases: list[Any] = [
        nan,
        inf,
        torch.randn(1, 3, HIDDEN),
        to_wire(torch.randn(1, 4, HIDDEN), "bfloat16", "none"),
    ]
    async with serve("llama") as harness:
        client = harness.client
        for bad in cases:
            await client.forward(x, forward_id=b"f")
            with remote("InvalidTensor"):
                await client.backward(x, bad, forward_id=b"f")
        # still served, exactly
        good = torch.randn(1, 4, HIDDEN)
        await client.forward(x, forward_id=b"f")
        reused, _ = await client.backward(x, good, forward_id=b"f")
        torch.testing.assert_close(reused, (await client.backward(x, good))[0], **EXACT)


# -- the budget, the time to live, the server's stop -------------------------------------------


@pytest.mark.anyio
async def test_the_server_keeps_to_its_budget_and_ttl(serve: Callable[..., Any]) -> None:
    x, grad = torch.randn(1, 8, HIDDEN), torch.randn(1, 8, HIDDEN)
    async with serve("llama") as harness:
        client, graphs = harness.client, harness.server.backend.graphs
        assert graphs is not None
        await client.forward(x, forward_id=b"a")
        one = graphs.bytes
        graphs.max_bytes = 2 * one + one // 2  # room for two such graphs
        await client.forward(x, forward_id=b"b")
        await client.forward(x, forward_id=b"c")  # evicts a, the least recently kept
        assert len(graphs) == 2 and graphs.bytes == 2 * one and graphs.evicted == 1
        recomputed, _ = await client.backward(x, grad)
        for forward_id in (b"a", b"b"):  # a was dropped (recomputed), b was kept
            reused, _ = await client.backward(x, grad, forward_id=forward_id)
            torch.testing.assert_close(reused, recomputed, **EXACT)
        assert len(graphs) == 1
        await client.backward(x, grad, forward_id=b"c")
        # a graph not taken in time expires, while the server is idle
        graphs.ttl = 0.2
        await client.forward(x, forward_id=b"t")
        assert len(graphs) == 1
        await eventually(lambda: len(graphs) == 0, within=10.0)
        assert graphs.bytes == 0
        # a graph alone over the budget is not kept; its backward recomputes
        graphs.max_bytes = one // 2
        await client.forward(torch.randn(1, 8, HIDDEN), forward_id=b"big")
        assert len(graphs) == 0
        await client.backward(x, grad, forward_id=b"big")
        # the server drops what it keeps when it stops
        graphs.max_bytes = 4 * one
        await client.forward(x, forward_id=b"left")
        assert len(graphs) == 1
    assert len(graphs) == 0


@pytest.mark.anyio
async def test_no_budget_keeps_nothing(serve: Callable[..., Any]) -> None:
    x, grad = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, HIDDEN)
    async with serve("llama", kept_graph_bytes=0) as harness:
        await harness.client.forward(x, forward_id=b"f")
        graphs = harness.server.backend.graphs
        assert graphs is not None and len(graphs) == 0 and graphs.declined == 0  # not even tried
        reused, _ = await harness.client.backward(x, grad, forward_id=b"f")
        torch.testing.assert_close(reused, (await harness.client.backward(x, grad))[0], **EXACT)
        with remote("UnknownForward"):
            await harness.client.backward(x, grad, forward_id=b"g")


# -- the store and the measurement, directly ---------------------------------------------------


def graph(nbytes: int) -> KeptGraph:
    t = torch.zeros(1)
    return KeptGraph(t, t, None, "float32", None, nbytes)


def test_store_evicts_least_recent_and_expires() -> None:
    store = GraphStore(max_bytes=100, ttl=10.0)
    assert store.keep("p", b"1", graph(40), now=0.0)
    assert store.keep("p", b"2", graph(40), now=1.0)
    assert store.keep("q", b"1", graph(40), now=2.0)  # evicts p/1
    assert ("p", b"1") not in store and store.bytes == 80 and store.evicted == 1
    assert not store.keep("p", b"3", graph(101), now=2.0)  # too big alone
    assert store.declined == 1 and store.bytes == 80
    assert store.take("p", b"1", now=3.0) is None  # seen, not kept
    assert store.take("p", b"3", now=3.0) is None
    with pytest.raises(UnknownForward):
        store.take("p", b"4", now=3.0)
    with pytest.raises(UnknownForward):
        store.take("r", b"1", now=3.0)  # q's id is not r's
    assert store.next_expiry() == 11.0
    assert store.expire(11.0) == 1 and store.next_expiry() == 12.0
    taken = store.take("q", b"1", now=11.5)
    assert taken is not None and store.bytes == 0 and len(store) == 0
    # a kept id replaced by a new forward of the same id
    store.keep("p", b"x", graph(10), now=20.0)
    store.keep("p", b"x", graph(30), now=21.0)
    assert len(store) == 1 and store.bytes == 30
    store.drop_caller("p")
    assert store.bytes == 0
    with pytest.raises(UnknownForward):
        store.take("p", b"x", now=22.0)


def test_seen_ids_are_bounded_per_caller_and_in_callers() -> None:
    store = GraphStore(max_bytes=0, ttl=1.0, seen_per_caller=3, max_callers=2)
    for i in range(5):
        store.remember("p", b"%d" % i)
    assert store.take("p", b"4", now=0.0) is None and store.take("p", b"2", now=0.0) is None
    with pytest.raises(UnknownForward):
        store.take("p", b"1", now=0.0)  # forgotten: the oldest beyond 3
    store.remember("q", b"q")
    store.remember("r", b"r")  # forgets p, the least recent caller
    with pytest.raises(UnknownForward):
        store.take("p", b"4", now=0.0)
    assert store.take("q", b"q", now=0.0) is None


def test_record_graph_counts_saved_tensors_once_without_weights() -> None:
    x = torch.randn(8, 16, requires_grad=True)
    out, nbytes = record_graph(lambda: (x * 2).exp(), [x], set())
    # exp saves its output; x * 2 saves nothing: the output and the leaf
    assert nbytes == 2 * 8 * 16 * 4
    linear = torch.nn.Linear(16, 32).requires_grad_(False)
    out, nbytes = record_graph(lambda: linear(x), [x], storage_keys(linear.parameters()))
    assert nbytes == (8 * 16 + 8 * 32) * 4  # x (saved and leaf, once) and the output
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, linear.weight.sum(0).expand(8, 16))
