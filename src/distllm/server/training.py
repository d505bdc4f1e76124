"""Forward and backward requests, run on the compute thread (no KV cache).

Backward recomputes the forward under autograd and differentiates w.r.t. the inputs and the
deep prompts only: the span's weights (and adapters) are frozen, so no parameter gradient is
ever built. A forward may instead keep its graph (:func:`run_forward_keeping`) for the backward
that names it (:func:`run_backward_kept`): same gradients, no second forward. Which adapter the
span computes with is the caller's business (:class:`distllm.model.adapters.SpanAdapters`).
"""

from __future__ import annotations

import torch

from distllm.model import SpanModel
from distllm.protocol.errors import InvalidTensor
from distllm.protocol.span_messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
)
from distllm.server.graphs import KeptGraph, record_graph
from distllm.server.tensors import check_finite, from_wire, to_wire
from distllm.wire.tensors import WireTensor

__all__ = ["run_backward", "run_backward_kept", "run_forward", "run_forward_keeping"]


def _input(t: WireTensor, name: str, dtype: torch.dtype, finite: bool) -> torch.Tensor:
    tensor = from_wire(t)
    if finite:
        check_finite(tensor, name)
    return tensor.to(dtype)


def _leaves(
    span: SpanModel, request: ForwardRequest | BackwardRequest, finite: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The request's hidden states and prompts as fresh leaves that require grad (detached:
    the decoded tensor may be a view of the received frame)."""
    hidden = _input(request.hidden, "hidden", span.dtype, finite).detach().requires_grad_(True)
    prompts = None
    if request.prompts is not None:
        prompts = _input(request.prompts, "prompts", span.dtype, finite).detach()
        prompts.requires_grad_(True)
    return hidden, prompts


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


def graph_lower_bound(span: SpanModel, request: ForwardRequest) -> int:
    """Bytes a forward's graph keeps at least: every block saves its input."""
    shape = request.hidden.shape
    itemsize = torch.empty((), dtype=span.dtype).element_size()
    return shape[0] * shape[1] * shape[2] * itemsize * span.num_blocks


def run_forward_keeping(
    span: SpanModel,
    request: ForwardRequest,
    compression: str,
    finite: bool,
    exclude: set[int],
) -> tuple[ForwardResponse, KeptGraph]:
    """Run the forward under autograd; its response and its graph (sized, not yet kept).
    ``exclude``: storages not to count (the span's weights, see :func:`record_graph`)."""
    hidden, prompts = _leaves(span, request, finite)
    leaves = [hidden] if prompts is None else [hidden, prompts]
    out, nbytes = record_graph(lambda: span(hidden, prompts=prompts), leaves, exclude)
    graph = KeptGraph(out, hidden, prompts, request.hidden.dtype, request.adapter, nbytes)
    return ForwardResponse(to_wire(out, request.hidden.dtype, compression)), graph


def run_backward(
    span: SpanModel, request: BackwardRequest, compression: str, finite: bool
) -> BackwardResponse:
    hidden, prompts = _leaves(span, request, finite)
    grad_output = _input(request.grad_output, "grad_output", span.dtype, finite)
    leaves = [hidden] if prompts is None else [hidden, prompts]
    with torch.enable_grad():
        out = span(hidden, prompts=prompts)
        grads = torch.autograd.grad(out, leaves, grad_output)
    return _response(grads, request, compression)


def check_kept(graph: KeptGraph, request: BackwardRequest) -> None:
    """The backward is the one of the kept forward: same inputs' shapes, dtype and adapter."""
    hidden = request.hidden
    problems = []
    if tuple(graph.hidden.shape) != hidden.shape or graph.dtype != hidden.dtype:
        problems.append(
            f"hidden {hidden.dtype}{list(hidden.shape)} vs {graph.dtype}{list(graph.hidden.shape)}"
        )
    kept_prompts = None if graph.prompts is None else tuple(graph.prompts.shape)
    asked_prompts = None if request.prompts is None else request.prompts.shape
    if kept_prompts != asked_prompts:
        problems.append(f"prompts {asked_prompts} vs {kept_prompts}")
    if graph.adapter != request.adapter:
        problems.append(f"adapter {request.adapter!r} vs {graph.adapter!r}")
    if problems:
        raise InvalidTensor(
            "the backward does not match its forward_id's forward: " + "; ".join(problems)
        )


def run_backward_kept(
    span: SpanModel, graph: KeptGraph, request: BackwardRequest, compression: str, finite: bool
) -> BackwardResponse:
    """Differentiate the kept ``graph`` (taken from the store: this frees it)."""
    check_kept(graph, request)
    grad_output = _input(request.grad_output, "grad_output", span.dtype, finite)
    leaves = [graph.hidden] if graph.prompts is None else [graph.hidden, graph.prompts]
    with torch.enable_grad():
        grads = torch.autograd.grad(graph.output, leaves, grad_output)
    return _response(grads, request, compression)


def _response(
    grads: tuple[torch.Tensor, ...], request: BackwardRequest, compression: str
) -> BackwardResponse:
    dtype = request.hidden.dtype
    grad_prompts = to_wire(grads[1], dtype, compression) if request.prompts is not None else None
    return BackwardResponse(to_wire(grads[0], dtype, compression), grad_prompts)
