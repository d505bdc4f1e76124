"""A span server on the in-memory network, and a small test-side client of its RPCs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from distllm.config import RpcConfig
from distllm.ids import PeerAddress
from distllm.model import SpanModel, load_span
from distllm.protocol import (
    METHOD_BACKWARD,
    METHOD_FORWARD,
    METHOD_INFERENCE,
    METHOD_INFO,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
    SessionParams,
    SpanInfo,
    SpanInfoRequest,
    SpanSession,
    SpanShape,
)
from distllm.rpc import RpcEndpoint, RpcStream
from distllm.server.config import ServerConfig
from distllm.server.server import Server
from distllm.server.tensors import from_wire, to_wire
from distllm.testing import MemoryNetwork, memory_rpc_endpoints
from distllm.testing.models import make_tiny_model
from distllm.wire.tensors import WireTensor

MODEL = "tiny-test-model"
BLOCKS = 4
HIDDEN = 64
#: Small enough that tests see pages come and go; roomy enough for every test's sessions.
TEST_CONFIG = ServerConfig(cache_tokens=1024, page_size=4, max_length=256, step_timeout=20.0)
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``checkpoint(family)`` -> a tiny random checkpoint of 4 blocks (cached)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(
                family, tmp_path_factory.mktemp(family), with_tokenizer=False
            )
        return made[family]

    return get


@pytest.fixture(scope="session")
def local_span(checkpoint: Callable[[str], Path]) -> Callable[[str], SpanModel]:
    """``local_span(family)`` -> the same blocks, loaded locally: the reference."""
    loaded: dict[str, SpanModel] = {}

    def get(family: str) -> SpanModel:
        if family not in loaded:
            loaded[family] = load_span(checkpoint(family), 0, BLOCKS)
        return loaded[family]

    return get


def wire(tensor: torch.Tensor | None, dtype: str = "float32") -> WireTensor | None:
    if tensor is None:
        return None
    if tensor.dtype == torch.int64:
        return WireTensor.from_numpy(tensor.numpy())
    return to_wire(tensor, dtype, "none")


@dataclass
class Session:
    """One open ``span.inference`` stream, checked by the client-side state machine."""

    stream: RpcStream
    machine: SpanSession
    opened: InferenceOpened
    dtype: str = "float32"
    _step_ids: itertools.count[int] = field(default_factory=itertools.count)

    def make_step(
        self,
        hidden: torch.Tensor,
        start: int | None = None,
        hypo_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        output_tail: int | None = None,
    ) -> InferenceStep:
        return InferenceStep(
            wire(hidden, self.dtype),
            start,
            wire(hypo_ids),
            wire(prompts, self.dtype),
            next(self._step_ids),
            output_tail=output_tail,
        )

    async def step(
        self,
        hidden: torch.Tensor,
        start: int | None = None,
        hypo_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        output_tail: int | None = None,
    ) -> torch.Tensor:
        message = self.make_step(hidden, start, hypo_ids, prompts, output_tail)
        self.machine.send_step(message)
        await self.stream.send(message)
        with anyio.fail_after(30):
            output = await self.stream.receive_as(InferenceOutput)
        self.machine.receive_output(output)
        return from_wire(output.hidden).float().clone()

    async def send_unchecked(self, message: object) -> object:
        """Send anything, bypassing the client-side checks; return the reply."""
        await self.stream.send(message)
        with anyio.fail_after(30):
            return await self.stream.receive()


@dataclass
class SpanClient:
    """A test-side client of one server's span RPCs."""

    rpc: RpcEndpoint
    server: PeerAddress

    @asynccontextmanager
    async def session(
        self,
        max_length: int = 64,
        batch_size: int = 1,
        *,
        dtype: str = "float32",
        compression: str | None = None,
        model: str = MODEL,
        start: int = 0,
        end: int = BLOCKS,
        session_id: bytes | None = None,
    ) -> AsyncIterator[Session]:
        """A session of blocks ``[start, end)``; ``session_id`` defaults to a fresh one."""
        async with self.rpc.open_stream(self.server, METHOD_INFERENCE, timeout=60) as stream:
            if session_id is None:
                session_id = b"test-%d" % next(_ids)
            await stream.send(
                InferenceOpen(
                    model, start, end, max_length, batch_size, session_id, dtype, compression
                )
            )
            with anyio.fail_after(30):
                opened = await stream.receive_as(InferenceOpened)
            params = SessionParams(max_length, batch_size, dtype, SpanShape(end - start, HIDDEN))
            yield Session(stream, SpanSession(params), opened, dtype)

    async def info(self, session_id: bytes | None = None) -> SpanInfo:
        return await self.rpc.call(
            self.server, METHOD_INFO, SpanInfoRequest(session_id), response_type=SpanInfo
        )

    async def forward(
        self,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        adapter: str | None = None,
        forward_id: bytes | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        request = ForwardRequest(
            kwargs.pop("model", MODEL),
            kwargs.pop("start", 0),
            kwargs.pop("end", BLOCKS),
            wire(hidden),
            wire(prompts),
            kwargs.pop("compression", None),
            adapter=adapter,
            forward_id=forward_id,
        )
        reply = await self.rpc.call(
            self.server, METHOD_FORWARD, request, response_type=ForwardResponse
        )
        return from_wire(reply.hidden).float().clone()

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor | WireTensor,
        prompts: torch.Tensor | None = None,
        *,
        adapter: str | None = None,
        forward_id: bytes | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. ``hidden`` and ``prompts``; ``grad_output`` may come ready-made as
        a wire tensor (of another dtype, say)."""
        grad = grad_output if isinstance(grad_output, WireTensor) else wire(grad_output)
        request = BackwardRequest(
            MODEL,
            0,
            BLOCKS,
            wire(hidden),
            grad,
            wire(prompts),
            None,
            adapter=adapter,
            forward_id=forward_id,
        )
        reply = await self.rpc.call(
            self.server, METHOD_BACKWARD, request, response_type=BackwardResponse
        )
        grad_prompts = None
        if reply.grad_prompts is not None:
            grad_prompts = from_wire(reply.grad_prompts).clone()
        return from_wire(reply.grad_inputs).clone(), grad_prompts


@dataclass
class Harness:
    server: Server
    clients: list[SpanClient]
    network: MemoryNetwork
    endpoints: list[RpcEndpoint]

    @property
    def client(self) -> SpanClient:
        return self.clients[0]

    def free_tokens(self) -> int:
        return self.server.info().free_cache_tokens

    def all_free(self) -> bool:
        info = self.server.info()
        return info.free_cache_tokens == info.total_cache_tokens and info.sessions == 0


Serve = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture
def serve(checkpoint: Callable[[str], Path]) -> Serve:
    """``async with serve(family, clients=1, rpc_config=..., **config_overrides) as harness``:
    a server of ``family``'s tiny checkpoint (``TEST_CONFIG`` with the overrides) and clients."""

    @asynccontextmanager
    async def run(
        family: str = "llama",
        *,
        clients: int = 1,
        rpc_config: RpcConfig | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Harness]:
        config = replace(TEST_CONFIG, **overrides)
        network = MemoryNetwork()
        rpc = rpc_config or RpcConfig()
        async with (
            memory_rpc_endpoints(1 + clients, network=network, config=rpc) as endpoints,
            Server(endpoints[0], checkpoint(family), MODEL, 0, BLOCKS, config=config) as server,
        ):
            clients_ = [SpanClient(e, endpoints[0].address) for e in endpoints[1:]]
            yield Harness(server, clients_, network, endpoints)

    return run


@pytest.fixture
def make_client() -> Callable[[RpcEndpoint, PeerAddress], SpanClient]:
    """``make_client(rpc, server_address)`` -> a :class:`SpanClient` (for hand-built servers)."""
    return SpanClient
