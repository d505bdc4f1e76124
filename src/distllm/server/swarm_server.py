"""A server as a member of a swarm: DHT node + span server + throughput + announcements +
rebalancing, composed into one async context manager.

    async with SwarmServer(rpc, identity, resolve_model(path), initial_peers=[addr],
                           num_blocks=8) as node:
        ...  # serving; announced ONLINE

Entering: joins the DHT, picks the span (given, or the weakest window of ``num_blocks`` blocks
from the announced swarm — ``server/placement.py``), announces JOINING, loads the span, measures
throughput (cached), announces ONLINE. Leaving announces OFFLINE and frees everything.

With ``rebalance_period`` set, the server periodically re-reads the swarm and, when moving would
raise the swarm's bottleneck clearly (``placement.plan_move``), hands its sessions back (they end
with ``Busy``; clients fail over and replay elsewhere) and reloads at the new span.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from distllm.config import DHTConfig
from distllm.dht.node import DHTNode
from distllm.dht.records import verify_entry
from distllm.dht.schema import (
    ModelRecord,
    ServerRecord,
    ServerState,
    block_keys,
    decode_server_entry,
)
from distllm.errors import DistllmError, RemoteProtocolError
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.model import load_config
from distllm.model.resolve import ResolvedModel
from distllm.rpc import RpcEndpoint
from distllm.server.announcer import Announcer
from distllm.server.config import ServerConfig
from distllm.server.placement import ServedSpan, choose_start, plan_move
from distllm.server.server import Server
from distllm.server.throughput import measure_throughput

__all__ = ["SwarmServer", "SwarmServerOptions", "model_num_blocks"]

logger = logging.getLogger("distllm.server")


@dataclass(frozen=True, slots=True)
class SwarmServerOptions:
    """How a swarm member behaves (the span server's own settings are ``ServerConfig``)."""

    #: Seconds between re-announcements (records live three periods).
    announce_period: float = 30.0
    #: Seconds between rebalancing checks; ``None`` never moves.
    rebalance_period: float | None = None
    #: Moving must raise the swarm's bottleneck throughput by this factor.
    rebalance_min_gain: float = 1.33
    #: Measure throughput on start (cached per machine); off: announce a nominal 1.0.
    measure_throughput: bool = True
    #: Operator-given network bandwidth in Mbit/s caps the announced throughput.
    network_mbps: float | None = None

    def __post_init__(self) -> None:
        if not self.announce_period > 0:
            raise ValueError(f"announce_period must be > 0, got {self.announce_period!r}")
        if self.rebalance_period is not None and not self.rebalance_period > 0:
            raise ValueError(f"rebalance_period must be None or > 0, got {self.rebalance_period!r}")


def model_num_blocks(model: ResolvedModel) -> int:
    """Number of transformer blocks of a local checkpoint."""
    return int(load_config(model.path).num_hidden_layers)


@dataclass
class _Rates:
    inference_rps: float = 1.0
    forward_rps: float = 1.0
    throughput: float = 1.0


@dataclass
class SwarmServer:
    """One swarm member serving a span of ``model`` on an entered ``rpc`` endpoint."""

    rpc: RpcEndpoint
    identity: Identity
    model: ResolvedModel
    initial_peers: Sequence[PeerAddress] = ()
    #: The span ``(start, end)`` to serve; ``None``: choose ``num_blocks`` blocks by placement.
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    server_config: ServerConfig = field(default_factory=ServerConfig)
    dht_config: DHTConfig = field(default_factory=DHTConfig)
    options: SwarmServerOptions = field(default_factory=SwarmServerOptions)
    #: The address announced to others (default: the transport's own).
    public_address: PeerAddress | None = None

    _dht: DHTNode | None = field(default=None, init=False, repr=False)
    _server: Server | None = field(default=None, init=False, repr=False)
    _announcer: Announcer | None = field(default=None, init=False, repr=False)
    _tg: anyio.abc.TaskGroup | None = field(default=None, init=False, repr=False)
    _span: tuple[int, int] = field(default=(0, 0), init=False)
    _rates: _Rates = field(default_factory=_Rates, init=False, repr=False)
    _moved: anyio.Event | None = field(default=None, init=False, repr=False)
    moves: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks=(start, end) and num_blocks=N")
        total = model_num_blocks(self.model)
        if self.blocks is not None:
            start, end = self.blocks
            if not 0 <= start < end <= total:
                raise ValueError(
                    f"blocks [{start}, {end}) are not within the model's {total} blocks"
                )
        elif self.num_blocks is not None and not 1 <= self.num_blocks <= total:
            raise ValueError(f"num_blocks must be in 1..{total}, got {self.num_blocks!r}")
        self._total_blocks = total
        config_bytes = (self.model.path / "config.json").read_bytes()
        self._model_record = ModelRecord(
            self.model.name, total, self.model.name, hashlib.sha256(config_bytes).digest()
        )

    # -- state ---------------------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def address(self) -> PeerAddress:
        return self.public_address or self.rpc.address

    @property
    def start(self) -> int:
        return self._span[0]

    @property
    def end(self) -> int:
        return self._span[1]

    @property
    def server(self) -> Server:
        if self._server is None:
            raise RuntimeError("the server is not serving")
        return self._server

    @property
    def dht(self) -> DHTNode:
        if self._dht is None:
            raise RuntimeError("the swarm server is not running")
        return self._dht

    @property
    def state(self) -> ServerState:
        return self._announcer.state if self._announcer else ServerState.OFFLINE

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            self._dht = await self._enter_dht()
            self._span = self.blocks or await self._choose_span()
            ready = anyio.Event()
            tg.start_soon(self._serve, ready)
            await ready.wait()  # local work only (loading, measuring): no peer to time out
        except BaseException as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None  # entered
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def _enter_dht(self) -> DHTNode:
        assert self._tg is not None
        node = DHTNode(
            self.rpc,
            self.identity,
            initial_peers=self.initial_peers,
            config=self.dht_config,
            public_address=self.public_address,
        )
        started: DHTNode = await self._tg.start(_run_context, node)
        return started

    async def _serve(self, ready: anyio.Event) -> None:
        """Serve the current span; on a planned move, serve the new one."""
        while True:
            moved = self._moved = anyio.Event()
            announcer = Announcer(
                self.dht,
                self.identity,
                self._record,
                model_record=self._model_record,
                period=self.options.announce_period,
            )
            self._announcer = announcer
            async with anyio.create_task_group() as tg:
                await tg.start(announcer.run)
                start, end = self._span
                async with Server(
                    self.rpc, self.model.path, self.model.name, start, end,
                    config=self.server_config,
                ) as server:  # fmt: skip
                    self._server = server
                    await self._measure(server)
                    await announcer.switch(ServerState.ONLINE)
                    logger.info(
                        "ONLINE: serving %s blocks [%d, %d) at %s",
                        self.model.name, start, end, self.address,
                    )  # fmt: skip
                    ready.set()
                    if self.options.rebalance_period is not None:
                        tg.start_soon(self._rebalance_loop)
                    await moved.wait()
                    self._server = None
                tg.cancel_scope.cancel()  # the announcer announces OFFLINE on its way out
            self.moves += 1

    async def _measure(self, server: Server) -> None:
        if not self.options.measure_throughput:
            return
        span = server.backend.span
        measured = await anyio.to_thread.run_sync(
            lambda: measure_throughput(span, network_mbps=self.options.network_mbps)
        )
        self._rates = _Rates(measured.inference_rps, measured.forward_rps, measured.throughput)
        server.rates.inference_rps = measured.inference_rps
        server.rates.forward_rps = measured.forward_rps

    def _record(self, state: ServerState) -> ServerRecord:
        free = self._server.info().free_cache_tokens if self._server is not None else 0
        start, end = self._span
        return ServerRecord(
            peer_id=self.peer_id,
            addresses=(str(self.address),),
            state=state,
            model=self.model.name,
            start=start,
            end=end,
            throughput=_finite(self._rates.throughput),
            inference_rps=_finite(self._rates.inference_rps),
            forward_rps=_finite(self._rates.forward_rps),
            free_cache_tokens=free,
            dtype=self.server_config.dtype,
            quantization=None if self.server_config.quant == "none" else self.server_config.quant,
            adapters=self.server_config.adapter_names,
            version=self._server.info().version if self._server is not None else "unknown",
        )

    # -- placement -----------------------------------------------------------------------------

    async def swarm_spans(self) -> list[ServedSpan]:
        """The spans the swarm announces for this model (ONLINE and JOINING servers)."""
        keys = block_keys(self.model.name, 0, self._total_blocks)
        found = await self.dht.get_many(keys)
        latest: dict[PeerID, tuple[float, ServerRecord]] = {}
        for entries in found.values():
            for entry in entries.values():
                try:
                    verify_entry(entry)
                    record = decode_server_entry(entry)
                except RemoteProtocolError as exc:
                    logger.debug("ignoring a bad server record: %s", exc)
                    continue
                known = latest.get(record.peer_id)
                if known is None or entry.expiration > known[0]:
                    latest[record.peer_id] = (entry.expiration, record)
        return [
            ServedSpan(peer, rec.start, rec.end, rec.throughput)
            for peer, (_, rec) in latest.items()
            if rec.state is not ServerState.OFFLINE
        ]

    async def _choose_span(self) -> tuple[int, int]:
        assert self.num_blocks is not None
        spans = [s for s in await self.swarm_spans() if s.peer != self.peer_id]
        start = choose_start(self._total_blocks, self.num_blocks, spans)
        logger.info("placement: chose blocks [%d, %d)", start, start + self.num_blocks)
        return start, start + self.num_blocks

    async def rebalance_once(self) -> bool:
        """Check the swarm; move if it clearly helps. True if a move was started."""
        start, end = self._span
        me = ServedSpan(self.peer_id, start, end, self._rates.throughput)
        try:
            spans = await self.swarm_spans()
        except DistllmError as exc:
            logger.warning("rebalancing skipped: %s", exc)
            return False
        target = plan_move(self._total_blocks, me, spans, min_gain=self.options.rebalance_min_gain)
        if target is None:
            return False
        logger.info("rebalancing: moving from [%d, %d) to [%d, %d)",
                    start, end, target, target + end - start)  # fmt: skip
        self._span = (target, target + end - start)
        if self._moved is not None:
            self._moved.set()
        return True

    async def _rebalance_loop(self) -> None:
        assert self.options.rebalance_period is not None
        while True:
            await anyio.sleep(self.options.rebalance_period)
            if await self.rebalance_once():
                return


async def _run_context(
    node: DHTNode, *, task_status: anyio.abc.TaskStatus[DHTNode] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Hold ``node`` entered in its own task until cancelled (a sibling, not a nested scope)."""
    async with node:
        task_status.started(node)
        await anyio.sleep_forever()


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value >= 0 else 0.0
