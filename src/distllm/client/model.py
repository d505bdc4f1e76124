"""A model served by the swarm, as the client holds it: the local parts (embeddings, final
norm, LM head, tokenizer) and the routing state of its blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distllm.client.config import ClientConfig
from distllm.client.events import EventCallback
from distllm.client.router import Router
from distllm.client.sequential import remote_backward, remote_forward
from distllm.client.session import InferenceSession
from distllm.model import ClientParts
from distllm.rpc import RpcEndpoint

__all__ = ["RemoteModel"]


class RemoteModel:
    """``name`` as the swarm serves it; get one from :meth:`distllm.Client.model`.

    ``config`` is the checkpoint's ``transformers`` config, ``tokenizer`` its tokenizer
    (``None`` when the checkpoint has none), ``parts`` what runs locally.
    """

    def __init__(
        self,
        *,
        name: str,
        path: Path,
        parts: ClientParts,
        tokenizer: Any,
        rpc: RpcEndpoint,
        router: Router,
        client_config: ClientConfig,
    ) -> None:
        self.name = name
        self.path = path
        self.parts = parts
        self.config = parts.config
        self.tokenizer = tokenizer
        self.rpc = rpc
        self.router = router
        self.client_config = client_config
        self.num_blocks = router.num_blocks
        self.hidden_size = int(parts.config.hidden_size)

    def inference_session(
        self, *, max_length: int, batch_size: int = 1, on_event: EventCallback | None = None
    ) -> InferenceSession:
        """A session of ``batch_size`` rows and up to ``max_length`` positions; enter it with
        ``async with``. ``on_event`` is called with each route event (see ``session.events``)."""
        return InferenceSession(
            self, max_length=max_length, batch_size=batch_size, on_event=on_event
        )

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[b, T, h]`` (embeddings) through every block, causally from position 0
        (stateless; routed for throughput; a failed server is replaced)."""
        return await remote_forward(self, hidden)

    async def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradients w.r.t. ``hidden`` given ``grad_output`` w.r.t. the blocks' outputs (the
        servers recompute their spans; their weights stay frozen)."""
        return await remote_backward(self, hidden, grad_output)

    async def refresh(self) -> None:
        """Re-read the swarm's announcements for this model now."""
        await self.router.refresh()

    def __repr__(self) -> str:
        servers = len(self.router.view.servers)
        return f"RemoteModel({self.name!r}, {self.num_blocks} blocks, {servers} servers)"
