"""Autograd graphs kept from a forward for its backward (``forward_id``; ``docs/server.md``).

A ``span.forward`` that names a ``forward_id`` may run with autograd on (w.r.t. its hidden
states and prompts) and leave its graph here, keyed by ``(caller, forward_id)``; the caller's
``span.backward`` with that id then takes (pops) it and differentiates without recomputing the
forward. The store is bounded:

* bytes -- what a graph keeps alive, measured when it is recorded (:func:`record_graph`): the
  tensors autograd saved plus the output and the leaves, counted once per storage, the span's
  own weights excluded. Beyond ``max_bytes`` the least recently kept graphs are dropped; a graph
  alone over ``max_bytes`` is not kept at all.
* age -- a graph not taken within ``ttl`` seconds is dropped (``expire(now)``).

Whether a forward id was ever *seen* (kept or not) is remembered separately, a bounded number of
recent ids per caller: a backward naming an id the caller never used is refused
(``UnknownForward``); one seen but no longer kept is recomputed from its ``hidden``.

The store itself reads no clock (time comes in as ``now``) and does no torch work;
:func:`record_graph` does. Only the compute thread touches either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

from distllm.protocol.errors import UnknownForward

__all__ = ["GraphStore", "KeptGraph", "record_graph", "storage_keys"]

#: Recent forward ids remembered per caller, and callers remembered (least recent forgotten).
SEEN_PER_CALLER = 1024
MAX_CALLERS = 1024


@dataclass(eq=False)
class KeptGraph:
    """A forward's autograd graph: ``output`` computed from the leaves ``hidden`` (and
    ``prompts``), plus what a backward must match to use it."""

    output: torch.Tensor  # [b, T, h], requires grad
    hidden: torch.Tensor  # leaf [b, T, h], in the span's dtype
    prompts: torch.Tensor | None  # leaf [blocks, b or 1, P, h], or None
    dtype: str  # the request's activation dtype (wire)
    adapter: str | None
    nbytes: int  # what the graph keeps alive
    expires_at: float = 0.0  # set when kept


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    """The storages (by data pointer) of ``tensors``, e.g. a span's weights: not counted."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def record_graph(
    compute: Callable[[], torch.Tensor],
    leaves: Iterable[torch.Tensor],
    exclude: set[int],
) -> tuple[torch.Tensor, int]:
    """Run ``compute`` under autograd; its output and the bytes its graph keeps alive.

    Counted once per storage: every tensor autograd saves for the backward, the output and the
    ``leaves``; storages in ``exclude`` (the weights, which live anyway) are not.
    """
    sizes: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in exclude and key not in sizes:
            sizes[key] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        count(tensor)
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        output = compute()
    for tensor in (output, *leaves):
        count(tensor)
    return output, sum(sizes.values())


class GraphStore:
    """Kept graphs by ``(caller, forward_id)``, within a byte budget and a time to live."""

    def __init__(
        self,
        max_bytes: int,
        ttl: float,
        *,
        seen_per_caller: int = SEEN_PER_CALLER,
        max_callers: int = MAX_CALLERS,
    ) -> None:
        if max_bytes < 0 or ttl <= 0 or seen_per_caller < 1 or max_callers < 1:
            raise ValueError("max_bytes >= 0, ttl > 0, seen_per_caller and max_callers >= 1")
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._seen_per_caller = seen_per_caller
        self._max_callers = max_callers
        # Invariant: oldest first; expires_at ascending (ttl is fixed); bytes == sum of nbytes.
        self._graphs: OrderedDict[tuple[Hashable, bytes], KeptGraph] = OrderedDict()
        self._seen: OrderedDict[Hashable, OrderedDict[bytes, None]] = OrderedDict()
        self.bytes = 0
        #: Graphs dropped before their backward came (budget or age), and never kept (too big).
        self.evicted = 0
        self.declined = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: object) -> bool:
        return key in self._graphs

    def fits(self, nbytes: int) -> bool:
        """Whether a graph of ``nbytes`` could be kept at all."""
        return nbytes <= self.max_bytes

    def remember(self, caller: Hashable, forward_id: bytes) -> None:
        """Note that ``caller`` ran a forward named ``forward_id`` (kept or not)."""
        ids = self._seen.pop(caller, None)
        if ids is None:
            ids = OrderedDict()
            while len(self._seen) >= self._max_callers:
                self._seen.popitem(last=False)
        self._seen[caller] = ids  # most recent caller last
        ids.pop(forward_id, None)
        ids[forward_id] = None
        while len(ids) > self._seen_per_caller:
            ids.popitem(last=False)

    def keep(self, caller: Hashable, forward_id: bytes, graph: KeptGraph, now: float) -> bool:
        """Keep ``graph`` for ``caller``'s backward (replacing an older one of the same id);
        ``False`` when it alone exceeds the budget (then it is not kept)."""
        self.remember(caller, forward_id)
        key = (caller, forward_id)
        self._drop(key)
        if not self.fits(graph.nbytes):
            self.declined += 1
            return False
        while self._graphs and self.bytes + graph.nbytes > self.max_bytes:
            _, oldest = self._graphs.popitem(last=False)
            self.bytes -= oldest.nbytes
            self.evicted += 1
        graph.expires_at = now + self.ttl
        self._graphs[key] = graph
        self.bytes += graph.nbytes
        return True

    def take(self, caller: Hashable, forward_id: bytes, now: float) -> KeptGraph | None:
        """Pop ``caller``'s graph of ``forward_id``; ``None`` if it was seen but is no longer
        kept. Raises :class:`UnknownForward` for an id the caller never used (recently)."""
        self.expire(now)
        graph = self._graphs.pop((caller, forward_id), None)
        if graph is not None:
            self.bytes -= graph.nbytes
            return graph
        ids = self._seen.get(caller)
        if ids is None or forward_id not in ids:
            raise UnknownForward(
                f"no forward {forward_id.hex()[:64]} from this caller: run span.forward with "
                "this forward_id first, or send none to recompute"
            )
        return None

    def next_expiry(self) -> float | None:
        """When the oldest kept graph expires; ``None`` when none is kept."""
        for graph in self._graphs.values():
            return graph.expires_at
        return None

    def expire(self, now: float) -> int:
        """Drop graphs kept longer than ``ttl``; how many were dropped."""
        dropped = 0
        while self._graphs:
            key, graph = next(iter(self._graphs.items()))
            if graph.expires_at > now:
                break
            self._drop(key)
            dropped += 1
        self.evicted += dropped
        return dropped

    def callers(self) -> set[Hashable]:
        """The callers whose graphs are kept."""
        return {caller for caller, _ in self._graphs}

    def drop_caller(self, caller: Hashable) -> None:
        """Forget ``caller``'s graphs (and the ids it used)."""
        for key in [key for key in self._graphs if key[0] == caller]:
            self._drop(key)
        self._seen.pop(caller, None)

    def clear(self) -> None:
        """Drop every graph and forget every id (the server stops)."""
        self._graphs.clear()
        self._seen.clear()
        self.bytes = 0

    def _drop(self, key: tuple[Hashable, bytes]) -> None:
        graph = self._graphs.pop(key, None)
        if graph is not None:
            self.bytes -= graph.nbytes
