"""``distllm health``: what a swarm serves of a model — servers, spans, load, uncovered blocks.

Needs only the swarm (no local checkpoint): the block count comes from the model records the
servers publish. Exit status: 0 when every block is served, 1 when some are not (or nobody
publishes the model), 2 for bad arguments — handy in scripts and health checks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the command runs: `distllm --help` stays fast
    from distllm.client.swarm import SwarmView
    from distllm.dht.node import DHTNode
    from distllm.ids import PeerAddress

#: Seconds allowed for the whole survey.
SURVEY_TIMEOUT = 30.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "health",
        help="show which servers serve which blocks of a model",
        description=(
            "Survey the swarm reached through --initial-peers: the ONLINE servers of MODEL"
            " (the name servers announce), their spans, throughput and free cache, and the"
            " blocks nobody serves."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the model's name in the swarm")
    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="ADDR", help="DHT peers to join"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class Health:
    model: str
    num_blocks: int  # 0: no server publishes the model
    view: SwarmView | None

    @property
    def uncovered(self) -> list[int]:
        return self.view.uncovered_blocks() if self.view is not None else []

    @property
    def healthy(self) -> bool:
        return self.num_blocks > 0 and not self.uncovered


async def survey(dht: DHTNode, model: str) -> Health:
    """Read the model's records from the DHT (signatures checked by the readers below)."""
    from distllm.client.swarm import SwarmView
    from distllm.dht.records import verify_entry
    from distllm.dht.schema import block_keys, decode_model_entry, model_key
    from distllm.errors import RemoteProtocolError

    counts: Counter[int] = Counter()
    for entry in (await dht.get(model_key(model))).values():
        try:
            verify_entry(entry)
            counts[decode_model_entry(entry).num_blocks] += 1
        except RemoteProtocolError:
            continue  # a forged or malformed record says nothing about the model
    if not counts:
        return Health(model, 0, None)
    num_blocks = counts.most_common(1)[0][0]  # servers agree unless someone lies
    found = await dht.get_many(block_keys(model, 0, num_blocks))
    by_block = {
        block: found.get(key, {}).values()
        for block, key in enumerate(block_keys(model, 0, num_blocks))
    }
    return Health(
        model, num_blocks, SwarmView.from_entries(model, num_blocks, by_block, time.time())
    )


def render(health: Health) -> str:
    if health.view is None:
        return f"no server publishes model {health.model!r}"
    view = health.view
    lines = [f"model {health.model}: {health.num_blocks} blocks, {len(view.servers)} servers"]
    for info in sorted(view.servers.values(), key=lambda s: (s.start, s.end, str(s.peer))):
        lines.append(
            f"  blocks {info.start:>3}..{info.end - 1:<3} {info.peer.short}"
            f"  {info.inference_rps:9.1f} steps/s/block"
            f"  {info.free_cache_tokens:>8} free cache tokens  {info.address}"
        )
    coverage = [len(view.servers_for_block(b)) for b in range(health.num_blocks)]
    lines.append(f"  servers per block: {' '.join(str(c) for c in coverage)}")
    uncovered = health.uncovered
    lines.append(
        f"  UNSERVED blocks: {', '.join(map(str, uncovered))}"
        if uncovered
        else "  every block served"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import anyio

    from distllm.ids import PeerAddress

    try:
        initial = [PeerAddress.parse(text) for text in args.initial_peers]
    except ValueError as exc:
        print(f"distllm health: {exc}", file=sys.stderr)
        return 2
    health: Health = anyio.run(partial(_main, initial, args.model), backend=args.backend)
    print(render(health))
    return 0 if health.healthy else 1


async def _main(initial: list[PeerAddress], model: str) -> Health:
    import anyio

    from distllm.dht.node import DHTNode
    from distllm.identity import Identity
    from distllm.rpc import RpcEndpoint
    from distllm.transport.quic import QuicEndpoint

    identity = Identity.generate()
    host = "::" if any(":" in peer.host for peer in initial) else "0.0.0.0"
    with anyio.fail_after(SURVEY_TIMEOUT):
        async with (
            QuicEndpoint(identity, host, 0) as transport,
            RpcEndpoint(transport) as rpc,
            DHTNode(rpc, identity, initial_peers=initial, client_mode=True) as dht,
        ):
            return await survey(dht, model)
