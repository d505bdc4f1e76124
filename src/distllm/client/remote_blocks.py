"""Remote blocks inside a local autograd graph (prompt tuning, a local head being trained).

:class:`RemoteBlocks` puts :func:`~distllm.client.autograd.traced_forward` and
:func:`~distllm.client.autograd.traced_backward` behind a ``torch.autograd.Function``. Autograd
is synchronous, so the async calls run through ``call`` (by default on the event loop of the
anyio worker thread the forward runs in: ``await anyio.to_thread.run_sync(train_step)``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import torch
from torch import nn

from distllm.client.autograd import Gradients, traced_backward, traced_forward
from distllm.client.failures import check_adapter

if TYPE_CHECKING:
    from distllm.client.model import RemoteModel

__all__ = ["AsyncCall", "RemoteBlocks", "RemoteBlocksFunction"]

T = TypeVar("T")


class AsyncCall(Protocol):
    """Runs an async function to completion from synchronous code (another thread than the
    event loop's), e.g. ``Runtime.call`` of the Hugging Face face."""

    def __call__(self, func: Callable[[], Awaitable[T]], /) -> T: ...


class _LoopCall:
    """:class:`AsyncCall` onto the event loop of the anyio worker thread that created it
    (``anyio.to_thread.run_sync``); usable from any thread afterwards (torch may run a
    backward on a device thread of its own)."""

    def __init__(self) -> None:
        try:
            self._token = anyio.from_thread.run_sync(anyio.lowlevel.current_token)
        except RuntimeError as exc:
            raise RuntimeError(
                "RemoteBlocks without `call` must run in a worker thread of an anyio event "
                "loop (e.g. `await anyio.to_thread.run_sync(step)`); elsewhere pass `call`"
            ) from exc

    def __call__(self, func: Callable[[], Awaitable[T]], /) -> T:
        return anyio.from_thread.run(_awaited, func, token=self._token)


async def _awaited(func: Callable[[], Awaitable[T]]) -> T:
    return await func()


class RemoteBlocksFunction(torch.autograd.Function):
    """Every block of a remote model as one autograd node: ``(hidden, prompts) -> hidden``.

    ``apply(hidden, prompts, model, adapter, call, keep_graph)``; gradients flow to ``hidden``
    and ``prompts`` (the servers' weights are frozen).
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        hidden, prompts, model, adapter, call, keep_graph = args
        output, trace = call(
            functools.partial(
                traced_forward, model, hidden, prompts, adapter=adapter, keep_graph=keep_graph
            )
        )
        ctx.remote = (model, trace, call)
        return cast(torch.Tensor, output)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[torch.Tensor | None, ...]:
        (grad_output,) = grad_outputs
        model, trace, call = ctx.remote
        grads: Gradients = call(functools.partial(traced_backward, model, trace, grad_output))
        ctx.remote = None  # the trace holds every hop's inputs: free them now
        needs = ctx.needs_input_grad
        return (
            grads.hidden if needs[0] else None,
            grads.prompts if needs[1] else None,
            None,
            None,
            None,
            None,
        )


class RemoteBlocks(nn.Module):
    """Every block of ``model`` as a module of a local graph: ``forward(hidden, prompts=None)``
    ``[b, T, h] -> [b, T, h]`` (causal from position 0; deep ``prompts`` ``[num_blocks, b or 1,
    P, h]``), differentiable w.r.t. ``hidden`` and ``prompts``.

    Synchronous, like autograd: each call runs the async work through ``call`` -- by default on
    the event loop of the anyio worker thread it is called in. Servers are asked to keep their
    autograd graphs only when a gradient will be needed (grad mode on and an input requiring
    it). With ``adapter``, only servers that announce it are used, and they run it.
    """

    def __init__(
        self, model: RemoteModel, *, adapter: str | None = None, call: AsyncCall | None = None
    ) -> None:
        super().__init__()
        check_adapter(adapter)
        self.remote = model
        self.adapter = adapter
        self.call = call

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        needs_grad = hidden.requires_grad or (prompts is not None and prompts.requires_grad)
        keep_graph = torch.is_grad_enabled() and needs_grad
        call = self.call if self.call is not None else _LoopCall()
        output = RemoteBlocksFunction.apply(  # type: ignore[no-untyped-call]
            hidden, prompts, self.remote, self.adapter, call, keep_graph
        )
        return cast(torch.Tensor, output)

    def extra_repr(self) -> str:
        adapter = f", adapter={self.adapter!r}" if self.adapter is not None else ""
        return f"{self.remote.name!r}, {self.remote.num_blocks} blocks{adapter}"
