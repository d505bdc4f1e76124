"""Forward and backward requests, run on the compute thread (stateless: no KV cache).

Backward recomputes the forward under autograd and differentiates w.r.t. the inputs and the
deep prompts only: the span's weights are frozen, so no parameter gradient is ever built.
"""

from __future__ import annotations

import torch

from distllm.model import SpanModel
from distllm.protocol.span_messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
)
from distllm.server.tensors import check_finite, from_wire, to_wire
from distllm.wire.tensors import WireTensor

__all__ = ["run_backward", "run_forward"]


def _input(t: WireTensor, name: str, dtype: torch.dtype, finite: bool) -> torch.Tensor:
    tensor = from_wire(t)
    if finite:
        check_finite(tensor, name)
    return tensor.to(dtype)


def run_forward(
    span: SpanModel, request: ForwardRequest, compression: str, finite: bool
) -> ForwardResponse:
    hidden = _input(request.hidden, "hidden", span.dtype, finite)
    prompts = None
    if request.prompts is not None:
        prompts = _input(request.prompts, "prompts", span.dtype, finite)
    with torch.no_grad():
        out = span(hidden, prompts=prompts)
    return ForwardResponse(to_wire(out, request.hidden.dtype, compression))


def run_backward(
    span: SpanModel, request: BackwardRequest, compression: str, finite: bool
) -> BackwardResponse:
    dtype = request.hidden.dtype
    # detach: a fresh leaf (the decoded tensor may be a view of the received frame)
    hidden = _input(request.hidden, "hidden", span.dtype, finite).detach().requires_grad_(True)
    grad_output = _input(request.grad_output, "grad_output", span.dtype, finite)
    leaves = [hidden]
    prompts = None
    if request.prompts is not None:
        prompts = _input(request.prompts, "prompts", span.dtype, finite).detach()
        leaves.append(prompts.requires_grad_(True))
    with torch.enable_grad():
        out = span(hidden, prompts=prompts)
        grads = torch.autograd.grad(out, leaves, grad_output)
    grad_prompts = to_wire(grads[1], dtype, compression) if prompts is not None else None
    return BackwardResponse(to_wire(grads[0], dtype, compression), grad_prompts)
