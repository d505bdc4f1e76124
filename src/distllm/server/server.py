"""A span server: loads blocks ``[start, end)`` of a model, sizes the paged KV cache, serves the
span RPCs and runs the compute loop -- an async context manager owning one task group.

    async with Server(rpc, path, "my-model", 0, 16, config=ServerConfig(cache_tokens=32768)):
        ...  # serving until the block ends

Entering loads the span on the compute thread (the event loop keeps running), starts the compute
loop, then registers the methods on ``rpc`` (an entered :class:`~distllm.rpc.RpcEndpoint`; one
server per endpoint). Leaving refuses new calls with ``Busy``, ends every open session (its
caller gets ``Busy``), stops the compute loop and frees every page.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import torch

from distllm.ids import PeerID
from distllm.model import PagedKVCache, load_span
from distllm.model.adapters import load_adapters
from distllm.protocol.span_messages import SpanInfo
from distllm.rpc import RpcEndpoint
from distllm.server.backend import SpanBackend
from distllm.server.compute import ComputeLoop
from distllm.server.config import ServerConfig
from distllm.server.graphs import GraphStore
from distllm.server.handlers import ServedSpan, SpanHandlers
from distllm.server.sessions import SessionRegistry
from distllm.server.tensors import TORCH_DTYPES

__all__ = ["Server", "ServerInfo", "ServerRates"]

logger = logging.getLogger("distllm.server")

_DEFAULT_CONFIG = ServerConfig()
#: Seconds leaving waits for the session handlers to unwind after cancelling them.
_STOP_TIMEOUT = 5.0


def _version() -> str:
    try:
        return importlib.metadata.version("distllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ServerRates:
    """Measured throughput, in tokens/s per block; ``None`` until measured (the throughput
    module fills these in; they travel in :meth:`Server.info` and ``span.info``)."""

    inference_rps: float | None = None
    forward_rps: float | None = None


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A snapshot of what the server holds and how loaded it is (for announcements)."""

    model: str
    start: int
    end: int
    dtype: str
    hidden_size: int
    version: str
    free_cache_tokens: int
    total_cache_tokens: int
    page_size: int
    sessions: int
    queued_items: int
    queued_tokens: int
    inference_rps: float | None
    forward_rps: float | None


class Server:
    """Serves blocks ``[start, end)`` of the checkpoint at ``model_path`` as ``model_name``."""

    def __init__(
        self,
        rpc: RpcEndpoint,
        model_path: str | Path,
        model_name: str,
        start: int,
        end: int,
        *,
        config: ServerConfig = _DEFAULT_CONFIG,
    ) -> None:
        if not model_name:
            raise ValueError("model_name must not be empty")
        if not 0 <= start < end:
            raise ValueError(f"the span [{start}, {end}) must satisfy 0 <= start < end")
        self._rpc = rpc
        self._path = Path(model_path)
        self._model_name = model_name
        self._start, self._end = start, end
        self.config = config
        self.rates = ServerRates()
        self._version = _version()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._backend: SpanBackend | None = None
        self._compute: ComputeLoop | None = None
        self._sessions: SessionRegistry | None = None
        self._handlers: SpanHandlers | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def compute(self) -> ComputeLoop:
        """The compute loop (its ``stats`` and ``step_calls`` show batching at work)."""
        if self._compute is None:
            raise RuntimeError("the server is not running")
        return self._compute

    @property
    def backend(self) -> SpanBackend:
        if self._backend is None:
            raise RuntimeError("the server is not running")
        return self._backend

    def info(self) -> ServerInfo:
        """What the server holds and how loaded it is, now."""
        backend, compute, sessions = self.backend, self.compute, self._sessions
        assert sessions is not None  # set together with the backend
        cache = backend.cache
        total = cache.num_pages * cache.page_size
        free = cache.free_tokens
        if self.config.reserve_max_length:
            free = min(free, total - sessions.reserved_tokens)
        return ServerInfo(
            model=self._model_name,
            start=self._start,
            end=self._end,
            dtype=self.config.dtype,
            hidden_size=backend.span.hidden_size,
            version=self._version,
            free_cache_tokens=free,
            total_cache_tokens=total,
            page_size=cache.page_size,
            sessions=len(sessions),
            queued_items=compute.queued_items,
            queued_tokens=compute.queued_tokens,
            inference_rps=self.rates.inference_rps,
            forward_rps=self.rates.forward_rps,
        )

    def _span_info(self) -> SpanInfo:
        info = self.info()
        return SpanInfo(
            model=info.model,
            start=info.start,
            end=info.end,
            dtype=info.dtype,
            hidden_size=info.hidden_size,
            version=info.version,
            free_cache_tokens=info.free_cache_tokens,
            total_cache_tokens=info.total_cache_tokens,
            page_size=info.page_size,
            sessions=info.sessions,
            max_sessions=self.config.max_sessions,
            queued_items=info.queued_items,
            queued_tokens=info.queued_tokens,
            max_length=self.config.max_length,
            max_batch_size=self.config.max_batch_size,
            inference_rps=info.inference_rps,
            forward_rps=info.forward_rps,
            adapters=self.config.adapter_names,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def _load(self) -> SpanBackend:
        """On the compute thread: the span, its cache, the backend over both."""
        config = self.config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        span = load_span(
            self._path,
            self._start,
            self._end,
            dtype=TORCH_DTYPES[config.dtype],
            quant=config.quant,
        )
        # Before the cache: an adapter that does not fit fails the start, not a request.
        adapters = load_adapters(span, config.adapters) if config.adapters else None
        if config.cache_bytes is not None:
            pages = PagedKVCache.pages_for_bytes(span, config.cache_bytes, config.page_size)
            if pages < 1:
                raise ValueError(f"cache_bytes {config.cache_bytes} does not buy one KV page")
        else:
            pages = config.cache_tokens // config.page_size
        cache = PagedKVCache(span, pages, config.page_size)
        return SpanBackend(
            span,
            cache,
            max_batch_sessions=config.max_batch_sessions,
            check_finite=config.check_finite,
            adapters=adapters,
            graphs=GraphStore(config.kept_graph_bytes, config.kept_graph_ttl),
        )

    async def __aenter__(self) -> Self:
        if self._task_group is not None or self._backend is not None:
            raise RuntimeError("a Server can be entered only once")
        limiter = anyio.CapacityLimiter(1)  # the compute thread: one torch call at a time
        backend = await anyio.to_thread.run_sync(self._load, limiter=limiter)
        config = self.config
        cache = backend.cache
        self._backend = backend
        transport = self._rpc.transport
        self._compute = ComputeLoop(
            backend,
            config,
            limiter,
            # Kept graphs of a caller that left are dropped (keyed by the caller's PeerID).
            is_connected=lambda caller: (
                isinstance(caller, PeerID) and transport.is_connected(caller)
            ),
        )
        self._sessions = SessionRegistry(
            config.max_sessions, cache.num_pages * cache.page_size, config.reserve_max_length
        )
        served = ServedSpan(self._model_name, self._start, self._end, backend.span.hidden_size)
        self._handlers = SpanHandlers(
            served,
            config,
            self._compute,
            self._sessions,
            self._span_info,
            adapters=config.adapter_names,
        )
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await task_group.start(self._compute.run)
        except BaseException as exc:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._task_group = task_group
        self._handlers.register(self._rpc)
        logger.info(
            "serving blocks [%d, %d) of %s: %d cache tokens in pages of %d",
            self._start,
            self._end,
            self._model_name,
            cache.num_pages * cache.page_size,
            cache.page_size,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, handlers, sessions = self._task_group, self._handlers, self._sessions
        assert task_group is not None and handlers is not None and sessions is not None
        handlers.stopped = True  # calls arriving while we drain get Busy
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
            sessions.cancel_all()
            await sessions.wait_drained()
        task_group.cancel_scope.cancel()
        try:
            suppress = await task_group.__aexit__(exc_type, exc, tb)
        finally:
            # The compute loop is done: no thread touches the cache or the graphs any more.
            self.backend.release_all()
            self.backend.drop_graphs()
            # Gone for good: later calls get UnknownMethod, and a new Server (a span move)
            # can register on the same endpoint.
            handlers.unregister(self._rpc)
            logger.info("stopped serving blocks [%d, %d)", self._start, self._end)
        return suppress
