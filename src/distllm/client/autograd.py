"""Remote autograd through every block of a model: a traced forward, a backward over the trace.

:func:`traced_forward` sends hidden states (and deep prompts, sliced per hop) hop by hop along a
route chosen for throughput (:func:`~distllm.client.routes.plan_forward_route`), one unary
``span.forward`` per hop, and records a :class:`ForwardTrace`: per sub-batch, per hop, the
server, its inputs, its prompt slice and the ``forward_id`` it was asked to keep its autograd
graph under. A batch of more than ``ClientConfig.max_forward_tokens`` tokens is split into row
sub-batches that run concurrently, each on a route drawn for itself.

:func:`traced_backward` walks each sub-batch's hops in reverse with ``span.backward``, naming
each hop's ``forward_id`` (the server reuses the kept graph, or recomputes from the recorded
inputs when it no longer has it). A hop that fails -- in the forward or the backward -- bans its
server; its blocks are re-planned, its recorded inputs forwarded through the replacement(s)
and, in a backward, the gradient taken through them: same results, within the bounds of
``max_retries`` failovers and ``failover_timeout`` (then ``RouteFailedError``).

:class:`~distllm.client.remote_blocks.RemoteBlocks` puts both behind a
``torch.autograd.Function`` so that remote blocks sit in a local graph.

The servers' weights stay frozen: only the hidden states and the deep prompts get gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import torch

from distllm.client.failures import RouteFailedError, check_adapter, is_hop_failure
from distllm.client.planner import RouteHop
from distllm.client.tensors import TORCH_DTYPES, checked_prompts, finite, from_wire, to_wire
from distllm.client.watchdog import watched_call
from distllm.errors import LimitExceeded, RemoteError, RemoteProtocolError
from distllm.protocol.span_messages import (
    METHOD_BACKWARD,
    METHOD_FORWARD,
    METHOD_INFO,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    SpanInfo,
    SpanInfoRequest,
)

if TYPE_CHECKING:
    from distllm.client.model import RemoteModel

__all__ = [
    "ForwardTrace",
    "Gradients",
    "HopCall",
    "SubBatch",
    "traced_backward",
    "traced_forward",
]

T = TypeVar("T")
R = TypeVar("R")

#: Bytes of a fresh ``forward_id``.
_FORWARD_ID_BYTES = 16


# -- the trace ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HopCall:
    """One ``span.forward`` of a traced forward: what a backward through it needs."""

    hop: RouteHop
    inputs: torch.Tensor  # [rows, T, h] in the activation dtype: exactly what the server saw
    prompts: torch.Tensor | None  # [hop blocks, rows or 1, P, h]: the hop's slice
    forward_id: bytes | None  # the graph the server was asked to keep; None: not asked


@dataclass(frozen=True, slots=True)
class SubBatch:
    """Rows ``rows`` of the batch, sent through ``calls`` (in block order)."""

    rows: slice
    calls: tuple[HopCall, ...]


@dataclass(frozen=True, slots=True)
class ForwardTrace:
    """What :func:`traced_forward` did, for :func:`traced_backward`."""

    adapter: str | None
    shape: tuple[int, ...]  # of hidden (and of the output, and of grad_output)
    dtype: torch.dtype  # of hidden
    device: torch.device  # of hidden
    prompts_shape: tuple[int, ...] | None  # [num_blocks, b or 1, P, h]; None: no prompts
    prompts_dtype: torch.dtype | None
    parts: tuple[SubBatch, ...]


class Gradients(NamedTuple):
    """Gradients of a loss w.r.t. the blocks' inputs and (when given) the deep prompts."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None


# -- forward and backward ----------------------------------------------------------------------


async def traced_forward(
    model: RemoteModel,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None = None,
    *,
    adapter: str | None = None,
    keep_graph: bool = False,
) -> tuple[torch.Tensor, ForwardTrace]:
    """``hidden`` ``[b, T, h]`` through every block (causally from position 0), and the trace.

    ``prompts`` ``[num_blocks, b or 1, P <= T, h]``: deep prompts of the whole model, added
    before each block to the first ``P`` positions. ``adapter``: run the blocks with this LoRA
    adapter (only servers announcing it are used). ``keep_graph``: ask every server to keep its
    autograd graph for the backward (each hop call gets a fresh random ``forward_id``).
    """
    check_adapter(adapter)
    x = _activations(model, hidden)
    p = _deep_prompts(model, prompts, x)
    runs = [
        functools.partial(_forward_fitting, model, rows, x, p, adapter, keep_graph)
        for rows in _row_slices(x, model.client_config.max_forward_tokens)
    ]
    results = [part for parts in await _concurrently(runs) for part in parts]
    output = torch.cat([y for _, y in results]) if len(results) > 1 else results[0][1]
    trace = ForwardTrace(
        adapter=adapter,
        shape=tuple(hidden.shape),
        dtype=hidden.dtype,
        device=hidden.device,
        prompts_shape=None if prompts is None else tuple(prompts.shape),
        prompts_dtype=None if prompts is None else prompts.dtype,
        parts=tuple(part for part, _ in results),
    )
    return output.to(hidden.device, hidden.dtype), trace


async def traced_backward(
    model: RemoteModel, trace: ForwardTrace, grad_output: torch.Tensor
) -> Gradients:
    """Gradients w.r.t. the traced forward's ``hidden`` and ``prompts`` (``None`` without
    prompts; summed over the rows when the prompts had batch 1), given ``grad_output``
    w.r.t. its output (same shape)."""
    if tuple(grad_output.shape) != trace.shape:
        raise ValueError(
            f"grad_output {list(grad_output.shape)} must be shaped like the forward's hidden "
            f"{list(trace.shape)}"
        )
    dtype = TORCH_DTYPES[model.client_config.activation_dtype]
    g = finite(grad_output.detach().to(device="cpu", dtype=dtype), "grad_output")
    runs = [
        functools.partial(_backward_part, model, trace, part, g[part.rows]) for part in trace.parts
    ]
    results = await _concurrently(runs)
    grad_hidden = torch.cat([gh for gh, _ in results]) if len(results) > 1 else results[0][0]
    grad_prompts = None
    if trace.prompts_shape is not None:
        assert trace.prompts_dtype is not None
        accumulated = [gp for _, gp in results if gp is not None]
        if trace.prompts_shape[1] == 1:  # shared by every row: their gradients add up
            total = functools.reduce(torch.add, accumulated)
        else:  # [num_blocks, b, P, h]: the sub-batches' rows side by side
            total = torch.cat(accumulated, dim=1)
        grad_prompts = total.to(trace.device, trace.prompts_dtype)
    return Gradients(grad_hidden.to(trace.device, trace.dtype), grad_prompts)


async def _forward_part(
    model: RemoteModel,
    rows: slice,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    adapter: str | None,
    keep_graph: bool,
) -> tuple[SubBatch, torch.Tensor]:
    with anyio.CancelScope() as scope:
        budget = _Budget(model, scope)
        calls, y = await _forward_range(
            model, 0, model.num_blocks, x, prompts, budget, adapter, keep_graph
        )
    budget.check()
    return SubBatch(rows, tuple(calls)), y


async def _forward_fitting(
    model: RemoteModel,
    rows: slice,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    adapter: str | None,
    keep_graph: bool,
) -> list[tuple[SubBatch, torch.Tensor]]:
    """Rows ``rows`` of ``x`` (and of ``prompts``) through every block, as one sub-batch -- or,
    while a server finds the request too large (``LimitExceeded``: its ``max_request_tokens``,
    which servers do not announce), as two halves, recursively. A single row too large for the
    servers raises ``LimitExceeded``; nobody is banned for it."""
    try:
        return [
            await _forward_part(model, rows, x[rows], _rows_of(prompts, rows), adapter, keep_graph)
        ]
    except LimitExceeded:
        if rows.stop - rows.start < 2:
            raise
    middle = (rows.start + rows.stop) // 2
    first = await _forward_fitting(
        model, slice(rows.start, middle), x, prompts, adapter, keep_graph
    )
    return first + await _forward_fitting(
        model, slice(middle, rows.stop), x, prompts, adapter, keep_graph
    )


async def _backward_part(
    model: RemoteModel, trace: ForwardTrace, part: SubBatch, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    grad_prompts = None
    if trace.prompts_shape is not None:
        n, batch, length, h = trace.prompts_shape
        rows = 1 if batch == 1 else grad.shape[0]
        grad_prompts = torch.zeros(n, rows, length, h, dtype=grad.dtype)
    with anyio.CancelScope() as scope:
        budget = _Budget(model, scope)
        grad = await _backward_calls(model, part.calls, grad, grad_prompts, budget, trace.adapter)
    budget.check()
    return grad, grad_prompts


class _Budget:
    """One sub-batch's failovers: at most ``max_retries``, and from the first one on, the whole
    call must end within ``failover_timeout`` (``scope`` is around it)."""

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
        """Ban ``hop``'s server (unless a concurrent sub-batch just did); raise once the call
        is out of retries."""
        router = self.model.router
        if hop.peer not in router.banned():
            router.ban(hop.peer, error)
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


async def _forward_range(
    model: RemoteModel,
    start: int,
    end: int,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    budget: _Budget,
    adapter: str | None,
    keep_graph: bool,
) -> tuple[list[HopCall], torch.Tensor]:
    """Blocks ``[start, end)`` over ``x`` (``prompts``: theirs, ``[end - start, ...]``): the
    hop calls made, and the output. A failed hop is re-planned from its blocks on."""
    calls: list[HopCall] = []
    block = start
    tokens = x.shape[0] * x.shape[1]
    router = model.router
    while block < end:
        route = router.try_plan_forward(block, end, num_tokens=tokens, adapter=adapter)
        while route is None and calls:
            # Servers serve whole spans: the rest may chain only from an earlier boundary.
            popped = calls.pop()
            block, x = popped.hop.start, popped.inputs
            route = router.try_plan_forward(block, end, num_tokens=tokens, adapter=adapter)
        if route is None:  # from the start, refreshing and waiting for bans to end
            route = await router.plan_forward(
                block, end, num_tokens=tokens, deadline=budget.wait_deadline(), adapter=adapter
            )
        for hop in route:
            call = HopCall(
                hop,
                x,
                None if prompts is None else prompts[hop.start - start : hop.end - start],
                os.urandom(_FORWARD_ID_BYTES) if keep_graph else None,
            )
            try:
                call, y = await _call_forward(model, call, adapter)
            except Exception as exc:
                if not _hop_failure(exc):
                    raise
                budget.failed(hop, exc)
                break  # re-plan from this hop's blocks on
            router.on_success(hop.peer)
            calls.append(call)
            x, block = y, hop.end
    return calls, x


async def _backward_calls(
    model: RemoteModel,
    calls: Sequence[HopCall],
    grad: torch.Tensor,
    grad_prompts: torch.Tensor | None,
    budget: _Budget,
    adapter: str | None,
) -> torch.Tensor:
    """``grad`` w.r.t. the last call's output -> w.r.t. the first call's inputs; each call's
    prompt gradients are written into ``grad_prompts`` at its blocks. A failed call is replaced
    by a forward + backward over its blocks on other servers."""
    for call in reversed(calls):
        try:
            grad_inputs, grad_slice = await _call_backward(model, call, grad, adapter)
        except Exception as exc:
            if not _hop_failure(exc):
                raise
            budget.failed(call.hop, exc)
            hop = call.hop
            replacement, _ = await _forward_range(
                model, hop.start, hop.end, call.inputs, call.prompts, budget, adapter, True
            )
            grad = await _backward_calls(model, replacement, grad, grad_prompts, budget, adapter)
            continue
        model.router.on_success(call.hop.peer)
        if grad_prompts is not None and grad_slice is not None:
            grad_prompts[call.hop.start : call.hop.end] = grad_slice
        grad = grad_inputs
    return grad


# -- one hop -----------------------------------------------------------------------------------


async def _call_forward(
    model: RemoteModel, call: HopCall, adapter: str | None
) -> tuple[HopCall, torch.Tensor]:
    """The call as made (its inputs as the server decodes them) and the hop's output."""
    config = model.client_config
    hop, dtype = call.hop, config.activation_dtype
    wire = to_wire(call.inputs, dtype, config.compression or "none")
    if config.compression not in (None, "none"):
        call = dataclasses.replace(call, inputs=from_wire(wire))  # what a backward must send
    request = ForwardRequest(
        model.name,
        hop.start,
        hop.end,
        wire,
        None if call.prompts is None else to_wire(call.prompts, dtype),
        config.compression,
        adapter,
        call.forward_id,
    )
    response = await _watched_call(model, hop, METHOD_FORWARD, request, ForwardResponse)
    return call, _checked(from_wire(response.hidden), call.inputs, hop, "forward")


async def _watched_call(
    model: RemoteModel, hop: RouteHop, method: str, request: object, response_type: type[R]
) -> R:
    """``method(request)`` at ``hop``'s server within ``step_timeout``; the server is probed if
    it keeps the call waiting, so that a vanished one fails the call in a few hundred
    milliseconds, not after the transport's dead-peer timeout (:mod:`distllm.client.watchdog`)."""
    config = model.client_config
    probe_timeout = max(config.probe_timeout, 4 * model.router.view.rtt(hop.peer))

    async def call() -> R:
        return await model.rpc.call(
            hop.address, method, request, timeout=config.step_timeout, response_type=response_type
        )

    async def probe() -> SpanInfo:
        return await model.rpc.call(
            hop.address,
            METHOD_INFO,
            SpanInfoRequest(),
            timeout=probe_timeout,
            response_type=SpanInfo,
        )

    return await watched_call(
        call,
        probe,
        suspect_after=config.suspect_after,
        probe_timeout=probe_timeout,
        describe=repr(hop.peer),
    )


async def _call_backward(
    model: RemoteModel, call: HopCall, grad: torch.Tensor, adapter: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the call's inputs and prompts. A server that no longer knows the
    call's ``forward_id`` at all (``UnknownForward``: it restarted) is asked once more to
    recompute from the inputs."""
    try:
        return await _request_backward(model, call, grad, adapter, call.forward_id)
    except RemoteError as exc:
        if exc.type_name != "UnknownForward" or call.forward_id is None:
            raise
    return await _request_backward(model, call, grad, adapter, None)


async def _request_backward(
    model: RemoteModel,
    call: HopCall,
    grad: torch.Tensor,
    adapter: str | None,
    forward_id: bytes | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    config = model.client_config
    hop, dtype, codec = call.hop, config.activation_dtype, config.compression or "none"
    request = BackwardRequest(
        model.name,
        hop.start,
        hop.end,
        to_wire(call.inputs, dtype),  # as the server saw them in the forward (decoded)
        to_wire(grad, dtype, codec),
        None if call.prompts is None else to_wire(call.prompts, dtype),
        config.compression,
        adapter,
        forward_id,
    )
    response = await _watched_call(model, hop, METHOD_BACKWARD, request, BackwardResponse)
    grad_inputs = _checked(from_wire(response.grad_inputs), call.inputs, hop, "backward")
    if call.prompts is None:
        return grad_inputs, None
    if response.grad_prompts is None:
        raise RemoteProtocolError(f"{hop.peer!r} answered a backward with prompts without theirs")
    grad_prompts = _checked(from_wire(response.grad_prompts), call.prompts, hop, "backward")
    return grad_inputs, grad_prompts


def _checked(result: torch.Tensor, like: torch.Tensor, hop: RouteHop, what: str) -> torch.Tensor:
    if result.shape != like.shape or result.dtype != like.dtype:
        raise RemoteProtocolError(
            f"{hop.peer!r} answered a {what} of {like.dtype}{list(like.shape)} with "
            f"{result.dtype}{list(result.shape)}"
        )
    return result


# -- inputs ------------------------------------------------------------------------------------


def _hop_failure(exc: BaseException) -> bool:
    """A failure to route around -- but not ``LimitExceeded``: a request too large for a server
    is the caller's to shrink (:func:`_forward_fitting` halves it), not the server's fault."""
    return is_hop_failure(exc) and not isinstance(exc, LimitExceeded)


def _activations(model: RemoteModel, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() != 3 or hidden.shape[-1] != model.hidden_size or not hidden.shape[1]:
        raise ValueError(
            f"hidden must be [b, T >= 1, {model.hidden_size}], got {list(hidden.shape)}"
        )
    if not hidden.shape[0]:
        raise ValueError("hidden must have at least one row")
    dtype = TORCH_DTYPES[model.client_config.activation_dtype]
    return finite(hidden.detach().to(device="cpu", dtype=dtype).contiguous(), "hidden")


def _deep_prompts(
    model: RemoteModel, prompts: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor | None:
    if prompts is None:
        return None
    b, length, h = x.shape
    return checked_prompts(
        prompts,
        num_blocks=model.num_blocks,
        batch=b,
        max_length=length,
        hidden_size=h,
        dtype=x.dtype,
    )


def _row_slices(x: torch.Tensor, max_tokens: int) -> list[slice]:
    """Rows of ``x`` ``[b, T, h]`` in sub-batches of at most ``max_tokens`` tokens (at least
    one row each)."""
    b, length = x.shape[0], x.shape[1]
    per = max(1, max_tokens // length)
    return [slice(i, min(i + per, b)) for i in range(0, b, per)]


def _rows_of(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if prompts is None or prompts.shape[1] == 1:
        return prompts
    return prompts[:, rows].contiguous()


async def _concurrently(runs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Every ``run()`` at once; their results in order. The first failure cancels the others
    and is raised as it is (not in an exception group)."""
    if len(runs) == 1:
        return [await runs[0]()]
    results: dict[int, T] = {}
    errors: list[Exception] = []

    async def one(i: int, run: Callable[[], Awaitable[T]]) -> None:
        try:
            results[i] = await run()
        except Exception as exc:
            errors.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i, run in enumerate(runs):
            tg.start_soon(one, i, run)
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(runs))]
