"""Settings of a client. Invalid values raise ``ValueError``:
``"<field> must be <rule>, got <value>"``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distllm.client.planner import DEFAULT_COSTS, RouteCosts
from distllm.config import DHTConfig, RpcConfig
from distllm.protocol.span_messages import ACTIVATION_DTYPES
from distllm.wire.tensors import codecs_for

__all__ = ["ClientConfig"]

_DEFAULT_RPC = RpcConfig()
#: A client reads routes from the DHT: it asks all of the k closest nodes (not a quorum), so
#: that a server whose record some nodes lack is not missed.
_DEFAULT_DHT = DHTConfig(get_quorum=None)


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a client routes, waits for servers, and recovers from their failures.

    Time bounds: a hop that fails is detected within ``step_timeout`` (or sooner, when the
    transport notices a dead peer); a step then fails over at most ``max_retries`` times, and
    waits for banned servers only while ``failover_timeout`` after its first failure allows. A step
    with no server left raises ``NoRouteError``/``RouteFailedError`` instead of hanging.
    """

    #: Seconds one hop may take for one step: sending the inputs, queueing and computing on
    #: the server, receiving the outputs (a replay of a hop's history counts as one step).
    step_timeout: float = 30.0
    #: Seconds to open a session at a server: dialing and ``InferenceOpen`` -> ``Opened``.
    #: Also bounds each ``span.info`` RTT probe.
    connect_timeout: float = 5.0
    #: Seconds a closing session may spend saying goodbye to each server (it is reset after).
    close_timeout: float = 1.0
    #: Failovers one step (or one session opening, forward or backward call) may go through
    #: before it fails with ``RouteFailedError``.
    max_retries: int = 5
    #: Seconds after a step's first failure during which it may wait for banned servers to be
    #: allowed again when no other server can take their blocks; beyond, ``NoRouteError``.
    failover_timeout: float = 30.0
    #: A failed server is banned ``ban_base * ban_factor**(k-1)`` s (k: its consecutive
    #: failures), at most ``ban_cap`` s.
    ban_base: float = 1.0
    ban_factor: float = 2.0
    ban_cap: float = 60.0
    #: Seconds between refreshes of the swarm view from the DHT (servers join, leave, move);
    #: ``None``: only on demand (a failure with no known replacement).
    refresh_period: float | None = 30.0
    #: Seconds a refresh (DHT lookups and RTT probes) may take.
    refresh_timeout: float = 10.0
    #: An on-demand refresh is skipped when the view is younger than this many seconds.
    min_refresh_interval: float = 1.0
    #: dtype hidden states travel in, both ways (one of ``ACTIVATION_DTYPES``).
    activation_dtype: str = "float32"
    #: Codec of hidden states, both ways; ``None``: raw inputs, the server's default for
    #: outputs. Replays always travel raw so that a replacement sees exactly what the lost
    #: server saw.
    compression: str | None = None
    #: Most token positions (rows x length) one forward/backward call sends along one route: a
    #: larger batch is split into row sub-batches that run concurrently, each on a route of
    #: its own (load spreads over the servers). A single longer row is sent whole.
    max_forward_tokens: int = 8192
    #: An inference step unanswered after this many seconds gets its server probed
    #: (``span.info``); a server that does not answer the probe within ``probe_timeout`` (or
    #: 4 round trips, if longer) is treated as failed at once, without waiting for the
    #: transport's dead-peer timeout. A busy server answers and is waited for. ``None``: no
    #: probes (only ``step_timeout`` and the transport detect failures).
    suspect_after: float | None = 0.1
    probe_timeout: float = 0.2
    #: Inference steps go from server to server (``span.relay``): each server sends its
    #: output straight on to the next one and answers the client too (its outputs stay the
    #: history failover replays), which takes a client round trip per hop off every token.
    #: Steps that reorder rows (``hypo_ids``) and compressed activations go hop by hop.
    relay: bool = True
    #: Cost model of the route planner (hop overhead, penalty for servers short of cache).
    costs: RouteCosts = DEFAULT_COSTS
    #: Settings of the client's RPC endpoint and DHT node (by default its lookups ask every
    #: one of the k closest nodes: a complete view matters more than a few messages).
    rpc: RpcConfig = _DEFAULT_RPC
    dht: DHTConfig = _DEFAULT_DHT

    def __post_init__(self) -> None:
        for name in (
            "step_timeout",
            "connect_timeout",
            "close_timeout",
            "refresh_timeout",
            "probe_timeout",
            "ban_base",
            "ban_cap",
        ):
            value = getattr(self, name)
            _require(_positive(value), name, "a finite number > 0", value)
        _require(
            isinstance(self.max_retries, int) and self.max_retries >= 0,
            "max_retries",
            "an int >= 0",
            self.max_retries,
        )
        _require(
            isinstance(self.max_forward_tokens, int)
            and not isinstance(self.max_forward_tokens, bool)
            and self.max_forward_tokens >= 1,
            "max_forward_tokens",
            "an int >= 1",
            self.max_forward_tokens,
        )
        _require(
            isinstance(self.failover_timeout, int | float)
            and math.isfinite(self.failover_timeout)
            and self.failover_timeout >= 0,
            "failover_timeout",
            "a finite number >= 0",
            self.failover_timeout,
        )
        _require(
            _positive(self.ban_factor) and self.ban_factor >= 1,
            "ban_factor",
            "a finite number >= 1",
            self.ban_factor,
        )
        _require(self.ban_cap >= self.ban_base, "ban_cap", ">= ban_base", self.ban_cap)
        _require(
            self.suspect_after is None or _positive(self.suspect_after),
            "suspect_after",
            "None or a finite number > 0",
            self.suspect_after,
        )
        _require(
            self.refresh_period is None or _positive(self.refresh_period),
            "refresh_period",
            "None or a finite number > 0",
            self.refresh_period,
        )
        _require(
            isinstance(self.min_refresh_interval, int | float)
            and math.isfinite(self.min_refresh_interval)
            and self.min_refresh_interval >= 0,
            "min_refresh_interval",
            "a finite number >= 0",
            self.min_refresh_interval,
        )
        _require(
            self.activation_dtype in ACTIVATION_DTYPES,
            "activation_dtype",
            f"one of {ACTIVATION_DTYPES}",
            self.activation_dtype,
        )
        if self.activation_dtype in ACTIVATION_DTYPES:
            allowed = codecs_for(self.activation_dtype)
            _require(
                self.compression is None or self.compression in allowed,
                "compression",
                f"None or one of {allowed} for {self.activation_dtype}",
                self.compression,
            )
