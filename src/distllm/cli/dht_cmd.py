"""``distllm dht``: run a DHT bootstrap node on a QUIC endpoint until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from distllm.cli.common import concrete_host, write_atomically

if TYPE_CHECKING:  # imported when the command runs: `distllm --help` stays fast
    from distllm.config import TransportConfig
    from distllm.identity import Identity
    from distllm.ids import PeerAddress
    from distllm.rpc import RpcEndpoint

_log = logging.getLogger("distllm.cli.dht")

#: Seconds between the status lines the node logs.
STATUS_INTERVAL = 60.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "dht",
        help="run a DHT bootstrap node",
        description=(
            "Run a DHT node that serves the swarm's discovery records. It prints its address"
            " (distllm://<peer-id>@host:port): pass it to other peers as --initial-peers."
        ),
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("--port", type=int, default=31337, help="UDP port; 0 picks a free one")
    parser.add_argument(
        "--public-host",
        help="host to announce (default: --host; for 0.0.0.0 or ::, this machine's primary IP)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        metavar="FILE",
        help="key file (created if absent), so the address survives restarts; default: a new key",
    )
    parser.add_argument(
        "--initial-peers", nargs="+", default=[], metavar="ADDR", help="peers to join through"
    )
    parser.add_argument(
        "--address-file", type=Path, metavar="FILE", help="write the address there once listening"
    )
    parser.add_argument(
        "--max-datagram-size", type=int, default=1200, metavar="N", help="UDP datagram size"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import anyio

    from distllm.config import TransportConfig
    from distllm.identity import Identity
    from distllm.ids import PeerAddress

    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        initial = [PeerAddress.parse(text) for text in args.initial_peers]
        transport = TransportConfig(max_datagram_size=args.max_datagram_size)
        # Without a key file the node gets a new PeerID (so a new address) on every start.
        identity = (
            Identity.load_or_generate(args.identity) if args.identity else Identity.generate()
        )
    except (ValueError, OSError) as exc:
        print(f"distllm dht: {exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(partial(_main, args, identity, initial, transport), backend=args.backend)
    except OSError as exc:  # e.g. the port is taken
        print(f"distllm dht: {exc}", file=sys.stderr)
        return 1
    return 0


async def _main(
    args: argparse.Namespace,
    identity: Identity,
    initial: list[PeerAddress],
    transport_config: TransportConfig,
) -> None:
    import anyio

    from distllm.rpc import RpcEndpoint
    from distllm.transport.quic import QuicEndpoint

    # Bound before the task group, so that an OSError (port taken) arrives unwrapped.
    async with (
        QuicEndpoint(identity, args.host, args.port, transport_config) as transport,
        RpcEndpoint(transport) as rpc,
        anyio.create_task_group() as tg,
    ):
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            tg.start_soon(_run_node, args, rpc, identity, initial)
            async for signum in signals:
                _log.info("%s received: shutting down", signal.Signals(signum).name)
                break
        tg.cancel_scope.cancel()


async def _run_node(
    args: argparse.Namespace, rpc: RpcEndpoint, identity: Identity, initial: list[PeerAddress]
) -> None:
    import anyio

    from distllm.dht.node import DHTNode
    from distllm.ids import PeerAddress

    listening = rpc.address
    host = args.public_host or concrete_host(listening.host)
    public = PeerAddress(identity.peer_id, host, listening.port)
    if host != listening.host:
        print(
            f"listening on {listening.host} port {listening.port}; announcing {host}"
            " (--public-host chooses another)",
            file=sys.stderr,
            flush=True,
        )
    async with DHTNode(rpc, identity, initial_peers=initial, public_address=public) as node:
        print(public, flush=True)
        if args.address_file is not None:
            write_atomically(args.address_file, f"{public}\n")
        while True:
            _log.info(
                "DHT node %s: %d peers, %d records",
                node.peer_id.short,
                len(node.routing_table),
                node.record_count,
            )
            await anyio.sleep(STATUS_INTERVAL)
