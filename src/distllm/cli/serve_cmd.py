"""``distllm serve``: host a span of a model's blocks for the swarm until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from distllm.cli.common import concrete_host, write_atomically

if TYPE_CHECKING:  # imported when the command runs: `distllm --help` stays fast
    from distllm.config import TransportConfig
    from distllm.identity import Identity
    from distllm.ids import PeerAddress
    from distllm.model.resolve import ResolvedModel
    from distllm.server.config import ServerConfig
    from distllm.server.swarm_server import SwarmServer, SwarmServerOptions

_log = logging.getLogger("distllm.cli.serve")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a span of a model's blocks to the swarm",
        description=(
            "Load blocks of MODEL (a local Hugging Face checkpoint directory, a local .gguf file,"
            " or SmolLM2-135M-Instruct, the embedded default) and serve them to the swarm reached"
            " through --initial-peers. Without --blocks or --num-blocks, serves every block."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint dir, .gguf file or default name")
    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="ADDR", help="DHT peers to join"
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--blocks", metavar="START:END", help="serve blocks [START, END)")
    span.add_argument(
        "--num-blocks", type=int, metavar="N", help="serve N blocks where the swarm needs them"
    )
    parser.add_argument("--model-name", help="name in the swarm (default: directory name)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("--port", type=int, default=0, help="UDP port; 0 picks a free one")
    parser.add_argument("--public-host", help="host to announce (default: from --host)")
    parser.add_argument("--identity", type=Path, metavar="FILE", help="key file (kept PeerID)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--quant",
        choices=["none", "int8", "nf4"],
        default="none",
        help="quantize the span's weights with bitsandbytes (needs distllm[quant])",
    )
    parser.add_argument(
        "--cache-tokens", type=int, default=32768, metavar="N", help="KV cache budget in tokens"
    )
    parser.add_argument("--max-length", type=int, help="longest session a client may open")
    parser.add_argument("--num-threads", type=int, help="torch threads for compute")
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        type=parse_adapter,
        default=[],
        metavar="NAME=PATH",
        help=(
            "load the PEFT LoRA adapter in directory PATH (adapter_config.json +"
            " adapter_model.safetensors) as NAME; repeat for more"
        ),
    )
    parser.add_argument(
        "--max-datagram-size", type=int, default=1200, metavar="N", help="UDP datagram size"
    )
    parser.add_argument(
        "--loopback-datagram-size",
        type=int,
        default=16384,
        metavar="N",
        help="UDP datagram size with peers on this machine (16384)",
    )
    parser.add_argument(
        "--relay-timeout",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="longest wait to relay a step's output to the next server before the client is"
        " told to send it itself (0.5)",
    )
    parser.add_argument("--announce-period", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--rebalance-period",
        type=float,
        metavar="SECONDS",
        help="check every SECONDS whether moving would help the swarm (default: never move)",
    )
    parser.add_argument(
        "--network-mbps", type=float, help="this host's bandwidth; caps announced throughput"
    )
    parser.add_argument(
        "--no-measure",
        action="store_true",
        help="skip the throughput measurement (announce a nominal rate)",
    )
    parser.add_argument(
        "--address-file", type=Path, metavar="FILE", help="write the address there once ONLINE"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.set_defaults(run=run)


def parse_adapter(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--adapter``: a valid adapter name and an existing directory."""
    from distllm.protocol.span_messages import ADAPTER_NAME

    name, sep, path_text = text.partition("=")
    if not sep or not name or not path_text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if ADAPTER_NAME.fullmatch(name) is None:
        raise argparse.ArgumentTypeError(
            f"adapter name {name!r}: use 1..64 characters of letters, digits, '_', '-', '.'"
        )
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"adapter {name!r}: no directory {path_text!r}")
    return name, path


def _parse_blocks(text: str) -> tuple[int, int]:
    start_text, sep, end_text = text.partition(":")
    if not sep or not start_text.isdigit() or not end_text.isdigit():
        raise ValueError(f"--blocks must look like START:END, got {text!r}")
    return int(start_text), int(end_text)


def run(args: argparse.Namespace) -> int:
    import anyio

    from distllm.config import TransportConfig
    from distllm.identity import Identity
    from distllm.ids import PeerAddress
    from distllm.model.resolve import resolve_model
    from distllm.server.config import ServerConfig
    from distllm.server.swarm_server import SwarmServerOptions, model_num_blocks

    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        model = resolve_model(args.model, name=args.model_name)
        blocks = _parse_blocks(args.blocks) if args.blocks else None
        if blocks is None and args.num_blocks is None:
            blocks = (0, model_num_blocks(model))
        extra = {} if args.max_length is None else {"max_length": args.max_length}
        plan = _Plan(
            identity=(
                Identity.load_or_generate(args.identity) if args.identity else Identity.generate()
            ),
            initial=[PeerAddress.parse(text) for text in args.initial_peers],
            model=model,
            blocks=blocks,
            transport=TransportConfig(
                max_datagram_size=args.max_datagram_size,
                loopback_datagram_size=args.loopback_datagram_size,
            ),
            server=ServerConfig(
                dtype=args.dtype,
                quant=args.quant,
                cache_tokens=args.cache_tokens,
                num_threads=args.num_threads,
                adapters=tuple(args.adapters),
                relay_timeout=args.relay_timeout,
                **extra,
            ),
            options=SwarmServerOptions(
                announce_period=args.announce_period,
                rebalance_period=args.rebalance_period,
                measure_throughput=not args.no_measure,
                network_mbps=args.network_mbps,
            ),
        )
    except (ValueError, OSError) as exc:
        print(f"distllm serve: {exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(partial(_main, args, plan), backend=args.backend)
    except (OSError, ValueError) as exc:  # port taken, span outside the model, ...
        print(f"distllm serve: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class _Plan:
    """The command line, parsed and validated."""

    identity: Identity
    initial: list[PeerAddress]
    model: ResolvedModel
    blocks: tuple[int, int] | None  # None: --num-blocks, chosen by placement
    transport: TransportConfig
    server: ServerConfig
    options: SwarmServerOptions


async def _main(args: argparse.Namespace, plan: _Plan) -> None:
    import anyio

    from distllm.ids import PeerAddress
    from distllm.rpc import RpcEndpoint
    from distllm.server.swarm_server import SwarmServer
    from distllm.transport.quic import QuicEndpoint

    # Bound before the task group, so that an OSError (port taken) arrives unwrapped.
    async with (
        QuicEndpoint(plan.identity, args.host, args.port, plan.transport) as transport,
        RpcEndpoint(transport) as rpc,
    ):
        listening = rpc.address
        host = args.public_host or concrete_host(listening.host)
        swarm_server = SwarmServer(
            rpc,
            plan.identity,
            plan.model,
            initial_peers=plan.initial,
            blocks=plan.blocks,
            num_blocks=args.num_blocks if plan.blocks is None else None,
            server_config=plan.server,
            options=plan.options,
            public_address=PeerAddress(plan.identity.peer_id, host, listening.port),
        )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_serve, args, swarm_server)
                async for signum in signals:
                    _log.info("%s received: shutting down", signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()


async def _serve(args: argparse.Namespace, swarm_server: SwarmServer) -> None:
    import anyio

    async with swarm_server as node:
        print(
            f"{node.address} serving {node.model.name} blocks {node.start}:{node.end}", flush=True
        )
        if args.address_file is not None:
            write_atomically(args.address_file, f"{node.address}\n")
        await anyio.sleep_forever()
