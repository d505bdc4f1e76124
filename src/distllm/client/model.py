"""A model served by the swarm, as the client holds it: the local parts (embeddings, final
norm, LM head, tokenizer) and the routing state of its blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distllm.client.autograd import Gradients, traced_backward, traced_forward
from distllm.client.config import ClientConfig
from distllm.client.events import EventCallback
from distllm.client.remote_blocks import AsyncCall, RemoteBlocks
from distllm.client.router import Router
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
        self,
        *,
        max_length: int,
        batch_size: int = 1,
        on_event: EventCallback | None = None,
        adapter: str | None = None,
    ) -> InferenceSession:
        """A session of ``batch_size`` rows and up to ``max_length`` positions; enter it with
        ``async with``. ``on_event`` is called with each route event (see ``session.events``).
        ``adapter``: run every block with this LoRA adapter (only servers announcing it)."""
        return InferenceSession(
            self, max_length=max_length, batch_size=batch_size, on_event=on_event, adapter=adapter
        )

    async def forward(
        self,
        hidden: torch.Tensor,
        *,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """``hidden`` ``[b, T, h]`` (embeddings) through every block, causally from position 0
        (stateless; routed for throughput; a failed server is replaced). ``prompts``: deep
        prompts ``[num_blocks, b or 1, P, h]``; ``adapter``: a LoRA adapter the servers load."""
        output, _ = await traced_forward(self, hidden, prompts, adapter=adapter)
        return output

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> Gradients:
        """Gradients w.r.t. ``hidden`` (and ``prompts``, else ``None``) given ``grad_output``
        w.r.t. the blocks' outputs: a forward whose graphs the servers keep, then a backward
        through it (the servers' weights stay frozen). To reuse a forward, use
        :func:`~distllm.client.autograd.traced_forward`/``traced_backward`` or :meth:`blocks`."""
        if grad_output.shape != hidden.shape:
            raise ValueError(
                f"grad_output {list(grad_output.shape)} must be shaped like hidden "
                f"{list(hidden.shape)}"
            )
        _, trace = await traced_forward(self, hidden, prompts, adapter=adapter, keep_graph=True)
        return await traced_backward(self, trace, grad_output)

    def blocks(self, *, adapter: str | None = None, call: AsyncCall | None = None) -> RemoteBlocks:
        """Every block as a ``torch.nn.Module`` of a local autograd graph (synchronous: see
        :class:`~distllm.client.remote_blocks.RemoteBlocks`; ``call`` runs its async work, by
        default on the loop of the anyio worker thread it is called from)."""
        return RemoteBlocks(self, adapter=adapter, call=call)

    async def refresh(self) -> None:
        """Re-read the swarm's announcements for this model now."""
        await self.router.refresh()

    def __repr__(self) -> str:
        servers = len(self.router.view.servers)
        return f"RemoteModel({self.name!r}, {self.num_blocks} blocks, {servers} servers)"
