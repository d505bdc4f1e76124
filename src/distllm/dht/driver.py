"""Runs the pure :class:`~distllm.dht.lookup.Lookup` over the network, and bounded fan-out.

The state machine decides whom to ask; this module asks: up to ``alpha`` queries at once, each
a task of one task group, their outcomes fed back in arrival order. The whole lookup sits under
one deadline; queries still in flight when it ends (done, or out of time) are cancelled.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from distllm.dht.lookup import Lookup, LookupStats
from distllm.errors import DistllmError, LocalProtocolError
from distllm.ids import PeerAddress

__all__ = ["DHTStats", "Query", "map_bounded", "run_lookup"]

V = TypeVar("V")
T = TypeVar("T")
R = TypeVar("R")

#: Asks one peer; returns the closer peers it named and its value (``None``: none). Raises a
#: ``DistllmError`` when the call fails or the reply is malformed.
Query = Callable[[PeerAddress], Awaitable[tuple[Sequence[PeerAddress], V | None]]]


@dataclass(slots=True)
class DHTStats:
    """Counters over every lookup a node ran (benchmarks and metrics read their deltas)."""

    lookups: int = 0
    queries: int = 0
    replies: int = 0
    failures: int = 0
    #: Sum of each lookup's longest referral chain (hops / lookups = mean hops).
    hops: int = 0

    def add(self, stats: LookupStats) -> None:
        self.lookups += 1
        self.queries += stats.queries
        self.replies += stats.replies
        self.failures += stats.failures
        self.hops += stats.hops


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[V]):
    address: PeerAddress
    closer: Sequence[PeerAddress] = ()
    value: V | None = None
    error: DistllmError | None = None


async def run_lookup(
    lookup: Lookup[V],
    query: Query[V],
    *,
    on_reply: Callable[[PeerAddress], None],
    on_failure: Callable[[PeerAddress, DistllmError], None],
    timeout: float,  # noqa: ASYNC109 (one deadline over many calls, each with its own)
) -> None:
    """Drive ``lookup`` until it is done, nobody is left to ask, or ``timeout`` seconds pass.

    ``on_reply``/``on_failure`` see every answered/failed query (routing table upkeep).
    """
    send, receive = anyio.create_memory_object_stream[_Outcome[V]](math.inf)
    with send, receive:
        async with anyio.create_task_group() as tg:
            with anyio.move_on_after(timeout):
                while not lookup.done:
                    for address in lookup.next_queries():
                        tg.start_soon(_ask, query, address, send)
                    if lookup.in_flight == 0:
                        break  # every known peer failed or answered
                    outcome = await receive.receive()
                    peer = outcome.address.peer_id
                    if outcome.error is not None:
                        lookup.on_failure(peer)
                        on_failure(outcome.address, outcome.error)
                    else:
                        lookup.on_reply(peer, outcome.closer, outcome.value)
                        on_reply(outcome.address)
            tg.cancel_scope.cancel()  # answers no longer needed


async def _ask(
    query: Query[V], address: PeerAddress, send: MemoryObjectSendStream[_Outcome[V]]
) -> None:
    try:
        closer, value = await query(address)
    except LocalProtocolError:
        raise  # our bug: surfaces
    except DistllmError as exc:
        send.send_nowait(_Outcome(address, error=exc))
    else:
        send.send_nowait(_Outcome(address, closer, value))


async def map_bounded(
    items: Sequence[T], fn: Callable[[T], Awaitable[R]], parallelism: int
) -> list[R]:
    """``[await fn(x) for x in items]`` with at most ``parallelism`` calls running at once."""
    results: list[R | None] = [None] * len(items)
    todo = iter(enumerate(items))

    async def worker() -> None:
        for index, item in todo:  # shared: each item goes to exactly one worker
            results[index] = await fn(item)

    async with anyio.create_task_group() as tg:
        for _ in range(min(parallelism, len(items))):
            tg.start_soon(worker)
    return results  # type: ignore[return-value]  # every slot was filled
