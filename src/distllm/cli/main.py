"""``distllm`` — the command-line entry point. Each subcommand lives in its own module and
registers its parser here; the heavy imports happen only when that subcommand runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from distllm.cli import demo_cmd, dht_cmd, generate_cmd, health_cmd, identity_cmd, serve_cmd

__all__ = ["build_parser", "main"]

Runner = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: tuple[
    tuple[str, Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]], ...
] = (
    ("identity", identity_cmd.register),
    ("dht", dht_cmd.register),
    ("serve", serve_cmd.register),
    ("generate", generate_cmd.register),
    ("health", health_cmd.register),
    ("demo", demo_cmd.register),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distllm",
        description="Run large language models over a swarm of machines.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, register in _SUBCOMMANDS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Logging is configured here, by the program, never at import time of the library.
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "DEBUG":
        # aioquic logs every stream reset and handshake at INFO: noise for an operator.
        logging.getLogger("quic").setLevel(logging.WARNING)
    runner: Runner = args.run
    try:
        return runner(args)
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    from distllm import __version__

    return f"distllm {__version__}"


if __name__ == "__main__":
    sys.exit(main())
