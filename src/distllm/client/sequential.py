"""Stateless forward and backward through every block of a model, over the swarm.

Each hop is one unary ``span.forward`` / ``span.backward`` call (deadline ``step_timeout``) on a
route chosen for throughput (:func:`~distllm.client.routes.plan_forward_route`: random, weighted
by the servers' forward rates). A failed hop bans its server and the rest of the way is
re-planned from that hop's inputs.

Backward runs the forward once more to learn each hop's inputs (servers keep nothing between
calls), then asks each hop, last first, for the gradients of its inputs given those of its
outputs (the server recomputes its span under autograd). A hop whose backward fails is replaced
by a fresh forward + backward over its blocks alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import torch

from distllm.client.failures import RouteFailedError, is_hop_failure
from distllm.client.planner import RouteHop
from distllm.client.tensors import TORCH_DTYPES, from_wire, to_wire
from distllm.errors import RemoteProtocolError
from distllm.protocol.span_messages import (
    METHOD_BACKWARD,
    METHOD_FORWARD,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
)

if TYPE_CHECKING:
    from distllm.client.model import RemoteModel

__all__ = ["remote_backward", "remote_forward"]


class _Budget:
    """One forward/backward call's failovers: at most ``max_retries``, and from the first one
    on, the whole call must end within ``failover_timeout`` (``scope`` is around it)."""

    def __init__(self, model: RemoteModel, scope: anyio.CancelScope) -> None:
        self.model = model
        self.scope = scope
        self.failures = 0
        self.last: tuple[RouteHop, Exception] | None = None

    def wait_deadline(self) -> float:
        """How long a plan may wait for bans to end."""
        if self.last is None:
            return anyio.current_time() + self.model.client_config.failover_timeout
        return self.scope.deadline

    def failed(self, hop: RouteHop, error: Exception) -> None:
        """Ban ``hop``'s server; raise once the call is out of retries."""
        self.model.router.ban(hop.peer, error)
        self.failures += 1
        if self.last is None:
            self.scope.deadline = anyio.current_time() + self.model.client_config.failover_timeout
        self.last = (hop, error)
        if self.failures > self.model.client_config.max_retries:
            raise RouteFailedError(self.model.name, hop, self.failures, error) from error

    def check(self) -> None:
        """After the scope: raise if the failovers ran out of time."""
        if self.scope.cancelled_caught and self.last is not None:
            hop, error = self.last
            within = self.model.client_config.failover_timeout
            raise RouteFailedError(
                self.model.name, hop, self.failures, error, within=within
            ) from error


async def remote_forward(model: RemoteModel, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[b, T, h]`` (the first block's inputs) -> the last block's outputs."""
    x = _activations(model, hidden)
    with anyio.CancelScope() as scope:
        budget = _Budget(model, scope)
        _, x = await _forward_range(model, 0, model.num_blocks, x, budget)
    budget.check()
    return x.to(hidden.dtype)


async def remote_backward(
    model: RemoteModel, hidden: torch.Tensor, grad_output: torch.Tensor
) -> torch.Tensor:
    """The gradient of a loss w.r.t. ``hidden`` (the first block's inputs), given its gradient
    ``grad_output`` w.r.t. the last block's outputs (same shape)."""
    if grad_output.shape != hidden.shape:
        raise ValueError(
            f"grad_output {list(grad_output.shape)} must be shaped like hidden {list(hidden.shape)}"
        )
    x = _activations(model, hidden)
    grad = grad_output.detach().to(x.dtype)
    with anyio.CancelScope() as scope:
        budget = _Budget(model, scope)
        grad = await _backward_range(model, 0, model.num_blocks, x, grad, budget)
    budget.check()
    return grad.to(hidden.dtype)


def _activations(model: RemoteModel, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() != 3 or hidden.shape[-1] != model.hidden_size or not hidden.shape[1]:
        raise ValueError(
            f"hidden must be [b, T >= 1, {model.hidden_size}], got {list(hidden.shape)}"
        )
    dtype = TORCH_DTYPES[model.client_config.activation_dtype]
    return hidden.detach().to(dtype).contiguous()


async def _forward_range(
    model: RemoteModel, start: int, end: int, x: torch.Tensor, budget: _Budget
) -> tuple[list[tuple[RouteHop, torch.Tensor]], torch.Tensor]:
    """Blocks ``[start, end)`` over ``x``: the hops used with their inputs, and the output."""
    used: list[tuple[RouteHop, torch.Tensor]] = []
    block = start
    tokens = x.shape[0] * x.shape[1]
    while block < end:
        route = model.router.try_plan_forward(block, end, num_tokens=tokens)
        while route is None and used:
            # Servers serve whole spans: the rest may chain only from an earlier boundary.
            popped, x = used.pop()
            block = popped.start
            route = model.router.try_plan_forward(block, end, num_tokens=tokens)
        if route is None:  # from the start, refreshing and waiting for bans to end
            route = await model.router.plan_forward(
                block, end, num_tokens=tokens, deadline=budget.wait_deadline()
            )
        for hop in route:
            try:
                y = await _call_forward(model, hop, x)
            except Exception as exc:
                if not is_hop_failure(exc):
                    raise
                budget.failed(hop, exc)
                break  # re-plan from this hop's blocks on
            model.router.on_success(hop.peer)
            used.append((hop, x))
            x, block = y, hop.end
    return used, x


async def _backward_range(
    model: RemoteModel,
    start: int,
    end: int,
    x: torch.Tensor,
    grad: torch.Tensor,
    budget: _Budget,
) -> torch.Tensor:
    used, _ = await _forward_range(model, start, end, x, budget)
    for hop, inputs in reversed(used):
        try:
            grad = await _call_backward(model, hop, inputs, grad)
        except Exception as exc:
            if not is_hop_failure(exc):
                raise
            budget.failed(hop, exc)
            grad = await _backward_range(model, hop.start, hop.end, inputs, grad, budget)
        else:
            model.router.on_success(hop.peer)
    return grad


async def _call_forward(model: RemoteModel, hop: RouteHop, x: torch.Tensor) -> torch.Tensor:
    config = model.client_config
    request = ForwardRequest(
        model.name,
        hop.start,
        hop.end,
        to_wire(x, config.activation_dtype, config.compression or "none"),
        None,
        config.compression,
    )
    response = await model.rpc.call(
        hop.address,
        METHOD_FORWARD,
        request,
        timeout=config.step_timeout,
        response_type=ForwardResponse,
    )
    return _checked(from_wire(response.hidden), x, hop, "forward")


async def _call_backward(
    model: RemoteModel, hop: RouteHop, x: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    config = model.client_config
    dtype, codec = config.activation_dtype, config.compression or "none"
    request = BackwardRequest(
        model.name,
        hop.start,
        hop.end,
        to_wire(x, dtype, codec),
        to_wire(grad, dtype, codec),
        None,
        config.compression,
    )
    response = await model.rpc.call(
        hop.address,
        METHOD_BACKWARD,
        request,
        timeout=config.step_timeout,
        response_type=BackwardResponse,
    )
    return _checked(from_wire(response.grad_inputs), x, hop, "backward")


def _checked(result: torch.Tensor, like: torch.Tensor, hop: RouteHop, what: str) -> torch.Tensor:
    if result.shape != like.shape or result.dtype != like.dtype:
        raise RemoteProtocolError(
            f"{hop.peer!r} answered a {what} of {like.dtype}{list(like.shape)} with "
            f"{result.dtype}{list(result.shape)}"
        )
    return result
