"""The client: a peer of the swarm that runs models whose blocks live on other machines.

    async with distllm.Client(initial_peers=[ADDR]) as client:
        model = await client.model("SmolLM2-135M-Instruct")
        async with model.inference_session(max_length=512) as session:
            async for text in session.generate("The capital of France is", max_new_tokens=20):
                print(text, end="")

An async context manager owning one task group: its transport (a QUIC endpoint of its own, or
one given, e.g. an in-memory endpoint in tests), an RPC endpoint, a DHT node in client mode
(it stores nothing for others), and one task per model keeping its swarm view fresh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import torch

from distllm.client.config import ClientConfig
from distllm.client.model import RemoteModel
from distllm.client.router import Router
from distllm.config import TransportConfig
from distllm.dht.node import DHTNode
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.model import load_client_parts
from distllm.model.resolve import resolve_model
from distllm.rpc import RpcEndpoint
from distllm.transport.base import Endpoint

__all__ = ["Client"]

logger = logging.getLogger("distllm.client")

_DEFAULT_TRANSPORT = TransportConfig()
_DEFAULT_CONFIG = ClientConfig()
#: Files whose presence means a checkpoint directory carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Client:
    """A client of the swarm reached through ``initial_peers`` (``distllm://`` addresses)."""

    def __init__(
        self,
        initial_peers: Sequence[str | PeerAddress],
        *,
        identity: Identity | None = None,
        transport: Endpoint | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        transport_config: TransportConfig = _DEFAULT_TRANSPORT,
        config: ClientConfig = _DEFAULT_CONFIG,
    ) -> None:
        if isinstance(initial_peers, str | PeerAddress):
            raise TypeError("initial_peers is a sequence of addresses, not one address")
        self._initial = [
            peer if isinstance(peer, PeerAddress) else PeerAddress.parse(peer)
            for peer in initial_peers
        ]
        if transport is not None:
            identity = identity or getattr(transport, "identity", None)
            if identity is None:
                raise ValueError("pass the identity of the given transport")
            if identity.peer_id != transport.peer_id:
                raise ValueError(f"{identity!r} is not the identity of the given transport")
        self.identity = identity or Identity.generate()
        self._transport = transport
        self._host, self._port = host, port
        self._transport_config = transport_config
        self.config = config
        self._stack: AsyncExitStack | None = None
        self._rpc: RpcEndpoint | None = None
        self._dht: DHTNode | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._models: dict[tuple[str, torch.dtype], RemoteModel] = {}

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def rpc(self) -> RpcEndpoint:
        if self._rpc is None:
            raise RuntimeError("the client is not running (use it as an async context manager)")
        return self._rpc

    @property
    def dht(self) -> DHTNode:
        if self._dht is None:
            raise RuntimeError("the client is not running (use it as an async context manager)")
        return self._dht

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("a Client can be entered only once")
        stack = self._stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            transport = self._transport
            if transport is None:
                from distllm.transport.quic import QuicEndpoint

                transport = await stack.enter_async_context(
                    QuicEndpoint(self.identity, self._host, self._port, self._transport_config)
                )
            self._rpc = await stack.enter_async_context(RpcEndpoint(transport, self.config.rpc))
            self._dht = await stack.enter_async_context(
                DHTNode(
                    self._rpc,
                    self.identity,
                    initial_peers=self._initial,
                    config=self.config.dht,
                    client_mode=True,
                )
            )
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)  # leaving stops the refresh tasks
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None  # entered
        try:
            # Everything below cleans up the same way either way; not passing the caller's
            # exception keeps it from coming out wrapped in an ExceptionGroup (trio).
            await self._stack.__aexit__(None, None, None)
        finally:
            self._rpc = self._dht = self._tg = None
        return None

    async def model(
        self, model: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
    ) -> RemoteModel:
        """The model at local checkpoint directory ``model`` (or the embedded default's name):
        loads its embeddings, final norm, LM head and tokenizer, and reads which servers hold
        its blocks. Asking twice gives the same object."""
        if self._tg is None:
            raise RuntimeError("the client is not running (use it as an async context manager)")
        name_or_path = model if isinstance(model, str) else Path(model)
        resolved = await anyio.to_thread.run_sync(resolve_model, name_or_path)
        key = (resolved.name, dtype)
        known = self._models.get(key)
        if known is not None:
            return known
        parts = await anyio.to_thread.run_sync(load_client_parts, resolved.path, dtype)
        tokenizer = await anyio.to_thread.run_sync(_load_tokenizer, resolved.path)
        router = Router(
            self.rpc, self.dht, resolved.name, int(parts.config.num_hidden_layers), self.config
        )
        await router.refresh()
        remote = self._models.setdefault(
            key,
            RemoteModel(
                name=resolved.name,
                path=resolved.path,
                parts=parts,
                tokenizer=tokenizer,
                rpc=self.rpc,
                router=router,
                client_config=self.config,
            ),
        )
        if remote.router is router:
            await self._tg.start(router.refresh_loop)
        return remote


def _load_tokenizer(path: Path) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
