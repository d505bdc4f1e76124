"""Sessions end whichever way their clients go: vanishing, idling by the thousand, or the server
stopping -- and their pages always come back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from distllm.config import RpcConfig
from distllm.errors import Busy, DeadlineExceeded
from distllm.model import SpanModel
from distllm.rpc.errors import UnknownMethod
from distllm.server.server import Server
from distllm.testing import eventually, memory_rpc_endpoints

pytestmark = pytest.mark.anyio

HIDDEN = 64


async def test_a_vanishing_client_frees_its_pages(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    async with serve("llama", clients=2) as harness:
        doomed, survivor = harness.clients
        total = harness.server.info().total_cache_tokens
        opened = anyio.Event()

        async def doomed_client() -> None:
            # two sessions: one between steps, one with a long prefill in flight
            async with doomed.session() as idle, doomed.session(max_length=256) as busy:
                await idle.step(torch.randn(1, 9, HIDDEN))
                await busy.step(torch.randn(1, 20, HIDDEN))
                await busy.stream.send(busy.make_step(torch.randn(1, 200, HIDDEN)))
                opened.set()
                await anyio.sleep_forever()

        x = torch.randn(1, 6, HIDDEN)
        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed_client)
            await opened.wait()
            assert harness.server.info().free_cache_tokens < total - 28
            harness.network.kill(doomed.rpc.peer_id, detect_immediately=True)
            # the other client is not disturbed
            async with survivor.session() as session:
                outputs = [await session.step(x[:, :3])]
                outputs += [await session.step(x[:, t : t + 1]) for t in range(3, 6)]
            await eventually(harness.all_free)
            tg.cancel_scope.cancel()  # the dead client's code: its process would be gone
        with torch.no_grad():
            expected = local_span("llama")(x)
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-4, rtol=1e-4)


async def test_a_thousand_idle_sessions_cost_no_pages_and_expire(
    serve: Callable[..., Any],
) -> None:
    count = 1000
    rpc_config = RpcConfig(max_concurrent_calls_per_peer=2 * count)
    async with serve("llama", rpc_config=rpc_config, session_idle_timeout=2.0) as harness:
        client = harness.client
        opened = 0
        all_open = anyio.Event()
        expired = 0

        async def idle_session() -> None:
            nonlocal opened, expired
            async with client.session() as session:
                opened += 1
                if opened == count:
                    all_open.set()
                with pytest.raises(DeadlineExceeded, match="idle"):
                    with anyio.fail_after(30):
                        await session.stream.receive()
                expired += 1

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(idle_session)
            with anyio.fail_after(30):
                await all_open.wait()
            info = harness.server.info()
            assert info.sessions == count
            assert info.free_cache_tokens == info.total_cache_tokens  # no page reserved ahead
        assert expired == count
        await eventually(harness.all_free)


async def test_stopping_the_server_ends_sessions_with_busy(
    checkpoint: Callable[[str], Path], make_client: Callable[..., Any]
) -> None:
    async with memory_rpc_endpoints(2) as (server_rpc, client_rpc):
        client = make_client(client_rpc, server_rpc.address)
        server = Server(server_rpc, checkpoint("llama"), "tiny-test-model", 0, 4)
        serving, stop = anyio.Event(), anyio.Event()

        async def run_server() -> None:
            async with server:
                serving.set()
                await stop.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_server)
            await serving.wait()
            async with client.session() as session:
                await session.step(torch.randn(1, 5, HIDDEN))
                stop.set()
                with pytest.raises(Busy, match="shutting down"), anyio.fail_after(5):
                    await session.stream.receive()
        cache = server.backend.cache
        assert cache.free_tokens == cache.num_pages * cache.page_size
        with pytest.raises(UnknownMethod):  # the server is gone; its methods with it
            await client.info()


async def test_info_reports_the_span_and_load(serve: Callable[..., Any]) -> None:
    async with serve("llama") as harness:
        harness.server.rates.inference_rps = 123.0
        info = await harness.client.info()
        assert (info.model, info.start, info.end, info.dtype) == (
            "tiny-test-model",
            0,
            4,
            "float32",
        )
        assert info.free_cache_tokens == info.total_cache_tokens == 1024
        assert info.inference_rps == 123.0 and info.forward_rps is None
        async with harness.client.session() as session:
            await session.step(torch.randn(1, 5, HIDDEN))
            info = await harness.client.info()
            assert info.sessions == 1
            assert info.free_cache_tokens == 1024 - 8  # two pages of 4 tokens
