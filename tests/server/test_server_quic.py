"""A real server process on loopback QUIC: a client process killed mid-session gets its pages
freed; malformed requests get errors and the server keeps serving.

The server process runs on trio, the test and the client process on asyncio: both backends
meet over real sockets.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import torch

from distllm.config import TransportConfig
from distllm.errors import DistllmError, PeerGone, RemoteError
from distllm.ids import PeerAddress
from distllm.model import SpanModel
from distllm.protocol import METHOD_FORWARD, METHOD_INFO, InferenceOpen, SpanInfo, SpanInfoRequest
from distllm.rpc import RpcEndpoint
from distllm.testing import identity_for

quic = pytest.importorskip("distllm.transport.quic")

pytestmark = pytest.mark.anyio

HIDDEN = 64
TRANSPORT = TransportConfig(max_datagram_size=16384, keepalive_interval=0.2, dead_peer_timeout=1.0)

_COMMON = """
import sys
import anyio
from distllm.config import TransportConfig
from distllm.rpc import RpcEndpoint
from distllm.testing import identity_for
from distllm.transport.quic import QuicEndpoint

TRANSPORT = TransportConfig(max_datagram_size=16384, keepalive_interval=0.2, dead_peer_timeout=1.0)
"""

SERVER = (
    _COMMON
    + """
from distllm.server.config import ServerConfig
from distllm.server.server import Server

async def main():
    config = ServerConfig(cache_tokens=1024, page_size=4, num_threads=1)
    async with (
        QuicEndpoint(identity_for(200), "127.0.0.1", 0, TRANSPORT) as transport,
        RpcEndpoint(transport) as rpc,
        Server(rpc, sys.argv[1], "tiny-test-model", 0, 4, config=config),
    ):
        print(rpc.address, flush=True)
        await anyio.sleep_forever()

anyio.run(main, backend="trio")
"""
)

CLIENT = (
    _COMMON
    + """
import numpy as np
from distllm.ids import PeerAddress
from distllm.protocol import InferenceOpen, InferenceOpened, InferenceOutput, InferenceStep
from distllm.wire.tensors import WireTensor

async def session(rpc, server, index, ready):
    async with rpc.open_stream(server, "span.inference") as stream:
        await stream.send(InferenceOpen(
            "tiny-test-model", 0, 4, 128, 2, b"doomed-%d" % index, "float32", None))
        await stream.receive_as(InferenceOpened)
        hidden = np.random.default_rng(index).standard_normal((2, 30, 64), dtype=np.float32)
        await stream.send(InferenceStep(WireTensor.from_numpy(hidden), None, None, None, 0))
        await stream.receive_as(InferenceOutput)
        ready()
        await anyio.sleep_forever()

async def main():
    server = PeerAddress.parse(sys.argv[1])
    opened = 0
    def ready():
        nonlocal opened
        opened += 1
        if opened == 3:
            print("ready", flush=True)
    async with (
        QuicEndpoint(identity_for(201), "127.0.0.1", 0, TRANSPORT) as transport,
        RpcEndpoint(transport) as rpc,
        anyio.create_task_group() as tg,
    ):
        for index in range(3):
            tg.start_soon(session, rpc, server, index, ready)

anyio.run(main)
"""
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server process runs on trio


@asynccontextmanager
async def process(script: str, *args: str) -> AsyncIterator[tuple[anyio.abc.Process, str]]:
    """Start ``python -c script args``; yield it with the first line it prints; kill it after."""
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    async with await anyio.open_process(command, stderr=None) as proc:
        try:
            assert proc.stdout is not None
            buffer = b""
            with anyio.fail_after(60):
                while b"\n" not in buffer:
                    buffer += await proc.stdout.receive()
            yield proc, buffer.decode().splitlines()[0]
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.move_on_after(10):
                await proc.wait()


async def info(rpc: RpcEndpoint, server: PeerAddress) -> SpanInfo:
    return await rpc.call(server, METHOD_INFO, SpanInfoRequest(), response_type=SpanInfo, timeout=5)


async def until(
    rpc: RpcEndpoint, server: PeerAddress, condition: Callable[[SpanInfo], bool]
) -> None:
    """Poll ``span.info`` until ``condition`` holds (10 s at most)."""
    with anyio.fail_after(10):
        while not condition(await info(rpc, server)):  # noqa: ASYNC110 (polling a peer)
            await anyio.sleep(0.05)


async def test_real_server_process_frees_a_killed_clients_pages_and_survives_bad_requests(
    checkpoint: Callable[[str], Path],
    make_client: Callable[..., Any],
    local_span: Callable[[str], SpanModel],
) -> None:
    path = checkpoint("llama")
    async with (
        process(SERVER, str(path)) as (_, address_line),
        quic.QuicEndpoint(identity_for(202), "127.0.0.1", 0, TRANSPORT) as transport,
        RpcEndpoint(transport) as rpc,
    ):
        server = PeerAddress.parse(address_line)
        total = (await info(rpc, server)).total_cache_tokens
        async with process(CLIENT, address_line) as (client_proc, ready):
            assert ready == "ready"
            busy = await info(rpc, server)
            assert busy.sessions == 3
            assert busy.free_cache_tokens == total - 3 * 2 * 32  # 2 rows x 30 tokens, 8 pages
            client_proc.send_signal(signal.SIGKILL)
            await client_proc.wait()
        # the server notices the dead connection (dead_peer_timeout 1 s) and frees everything
        await until(rpc, server, lambda now: now.free_cache_tokens == total and not now.sessions)

        client = make_client(rpc, server)
        # garbage on a raw stream: that stream dies, nothing else
        stream = await transport.open_stream(server)
        await stream.send(b"\x00\x00\x00\x05hello")

        async def drain() -> None:
            while True:
                await stream.receive()

        with anyio.fail_after(5), pytest.raises((PeerGone, anyio.EndOfStream)):
            await drain()
        await stream.aclose()
        with pytest.raises(RemoteError, match="RemoteProtocolError"):
            await rpc.call(server, METHOD_FORWARD, SpanInfoRequest(), timeout=5)
        with pytest.raises(RemoteError, match="InvalidTensor"):
            await client.forward(torch.full((1, 4, HIDDEN), float("inf")))
        async with client.session() as session:
            with pytest.raises(DistllmError, match="RemoteProtocolError"):
                await session.send_unchecked(
                    InferenceOpen("tiny-test-model", 0, 4, 8, 1, b"x", "float32", None)
                )
        # still serving, exactly
        x = torch.randn(2, 5, HIDDEN)
        async with client.session(batch_size=2) as session:
            out = torch.cat([await session.step(x[:, :3]), await session.step(x[:, 3:])], dim=1)
        with torch.no_grad():
            expected = local_span("llama")(x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(await client.forward(x), expected, atol=1e-4, rtol=1e-4)
        await until(rpc, server, lambda now: now.free_cache_tokens == total)
