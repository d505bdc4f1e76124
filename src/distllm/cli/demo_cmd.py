"""``distllm demo``: a whole swarm on this machine, asked one question.

A DHT bootstrap node and ``--servers`` servers -- each its own process, each serving a span of
the model's blocks, all talking QUIC over loopback -- come up; a client joins, waits until every
block is served, and streams the model's answer to a chat prompt, with the route it took and
its speed. The embedded default model (SmolLM2-135M-Instruct) is prepared on first use. Every
process stops at the end, on an error, or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from distllm.cli.generate_cmd import add_sampling_arguments, sampling_kwargs

if TYPE_CHECKING:  # imported when the command runs: `distllm --help` stays fast
    from distllm.cli.loopback import LoopbackSwarm
    from distllm.model.resolve import ResolvedModel

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a local swarm and ask it a question",
        description=(
            "Start a DHT node and several servers on this machine (separate processes, QUIC"
            " over loopback), each serving a span of the model's blocks, then generate an"
            " answer through them. The default model, SmolLM2-135M-Instruct, is prepared on"
            " first use."
        ),
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question to ask")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--servers", type=int, default=3, metavar="N", help="server processes")
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=2, metavar="N", help="torch threads per server (2)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=180.0, metavar="SECONDS", help="(180)"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from distllm.cli.loopback import COLOCATED_ENV, LoopbackSwarm, StartupError, even_spans

    # This process's client shares the cores with the servers it starts: the same short OpenMP
    # spin as theirs keeps its idle workers off the cores they compute on (about 10% more
    # tokens/s here). libgomp reads it once, when torch loads: before the imports below.
    for key, value in COLOCATED_ENV.items():
        os.environ.setdefault(key, value)

    import anyio

    from distllm.errors import DistllmError
    from distllm.model import load_config

    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        model = _prepare(args.model)
        num_blocks = int(load_config(model.path).num_hidden_layers)
        spans = even_spans(num_blocks, args.servers)
    except (ValueError, OSError) as exc:
        print(f"distllm demo: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="distllm-demo-") as tmp:
        swarm = LoopbackSwarm(Path(tmp), env=COLOCATED_ENV)
        try:
            with swarm:
                _start(swarm, model, spans, args)
                anyio.run(partial(_ask, args, model, swarm.initial_peers), backend=args.backend)
        except StartupError as exc:
            print(f"distllm demo: {exc}", file=sys.stderr)
            return 1
        except (DistllmError, OSError, ValueError) as exc:
            print(f"\ndistllm demo: {exc}", file=sys.stderr)
            _print_logs(swarm)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: the swarm is stopped", file=sys.stderr)
            return 130
    print("the swarm is stopped", file=sys.stderr)
    return 0


def _prepare(model: str | None) -> ResolvedModel:
    """The model to serve. The embedded default is converted on first use; transformers shows
    the conversion's progress bars (tqdm: de-quantizing the GGUF tensors, writing shards)."""
    from distllm.model.gguf import default_cache_dir
    from distllm.model.resolve import DEFAULT_MODEL, resolve_model

    if model is not None:
        return resolve_model(model)
    if not (default_cache_dir() / DEFAULT_MODEL / ".distllm-complete").is_file():
        print(
            f"preparing {DEFAULT_MODEL} (first use only): converting its GGUF weights to a"
            f" checkpoint in {default_cache_dir()}",
            file=sys.stderr,
            flush=True,
        )
    return resolve_model(DEFAULT_MODEL)


def _start(
    swarm: LoopbackSwarm,
    model: ResolvedModel,
    spans: list[tuple[int, int]],
    args: argparse.Namespace,
) -> None:
    print(f"starting a DHT node and {len(spans)} servers of {model.name} ...", file=sys.stderr)
    address = swarm.start_dht()
    print(f"  dht      {address}", file=sys.stderr)
    extra = ("--no-measure", "--num-threads", str(args.threads), "--cache-tokens", "8192")
    for span in spans:
        swarm.add_server(model.path, span, name=model.name, extra=extra)
    swarm.wait_ready(args.startup_timeout)
    for server, (start, end) in zip(swarm.servers, spans, strict=True):
        print(f"  blocks {start:>3}..{end - 1:<3} {server.address}", file=sys.stderr)


async def _ask(args: argparse.Namespace, model: ResolvedModel, peers: list[str]) -> None:
    from distllm.cli.generate_cmd import encode_prompt, stream_answer
    from distllm.client import Client

    async with Client(peers) as client:
        remote = await client.model(model.path)
        tokenizer = remote.tokenizer
        chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        prompt_ids = encode_prompt(remote, args.prompt, chat=chat)
        print(f"\n> {args.prompt}\n", flush=True)
        await stream_answer(
            remote,
            prompt_ids,
            args.max_new_tokens,
            sampling_kwargs(args),
            out=sys.stdout,
            info=sys.stderr,
        )


def _print_logs(swarm: LoopbackSwarm) -> None:
    for proc in [*([swarm.dht] if swarm.dht else []), *swarm.servers]:
        print(f"--- {proc.name} ({proc.log_file}):\n{proc.log_tail()}", file=sys.stderr)
