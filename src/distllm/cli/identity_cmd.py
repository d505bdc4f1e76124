"""``distllm identity``: create or show a peer identity file."""

from __future__ import annotations

import argparse
from pathlib import Path

from distllm.identity import Identity


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "identity",
        help="create or show a peer identity (Ed25519 key file)",
        description="Print the PeerID of the key in FILE, creating the key (mode 0600) if absent.",
    )
    parser.add_argument("file", type=Path, help="path of the PEM key file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path: Path = args.file
    existed = path.exists()
    identity = Identity.load_or_generate(path)
    verb = "loaded" if existed else "created"
    print(f"{identity.peer_id}\t({verb} {path})")
    return 0
