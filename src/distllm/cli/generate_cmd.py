"""``distllm generate``: join a swarm as a client and stream a model's answer to a prompt."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # imported when the command runs: `distllm --help` stays fast
    from distllm.client.model import RemoteModel
    from distllm.client.session import InferenceSession
    from distllm.ids import PeerAddress

#: Seconds to wait for the swarm to serve every block before giving up.
ROUTE_TIMEOUT = 30.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text with a model served by a swarm",
        description=(
            "Join the swarm reached through --initial-peers as a client, run MODEL (a local"
            " checkpoint directory, or SmolLM2-135M-Instruct) with its embeddings and head here"
            " and its blocks on the swarm, and stream the continuation of --prompt."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or default name")
    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="ADDR", help="DHT peers to join"
    )
    parser.add_argument("--prompt", required=True, help="text to continue (or to answer)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template (instruct models)",
    )
    parser.add_argument(
        "--no-relay",
        action="store_true",
        help="send every server its steps from here instead of having each server pass its"
        " output on to the next (for servers that cannot reach each other)",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.set_defaults(run=run)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling options (greedy unless one of them is given); shared with ``distllm demo``."""
    group = parser.add_argument_group("sampling (greedy unless one of these is given)")
    group.add_argument("--temperature", type=float, metavar="T")
    group.add_argument("--top-k", type=int, metavar="K")
    group.add_argument("--top-p", type=float, metavar="P")
    group.add_argument("--seed", type=int, metavar="S", help="seed of the sampler")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What ``InferenceSession.generate`` takes for the sampling options of ``args``."""
    do_sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return {
        "do_sample": do_sample,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def run(args: argparse.Namespace) -> int:
    import anyio

    from distllm.client.generation import SamplingParams
    from distllm.errors import DistllmError
    from distllm.ids import PeerAddress

    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        peers = [PeerAddress.parse(text) for text in args.initial_peers]
        SamplingParams(**sampling_kwargs(args))  # validates them before joining the swarm
    except ValueError as exc:
        print(f"distllm generate: {exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(partial(_main, args, peers), backend=args.backend)
    except (DistllmError, OSError, ValueError) as exc:
        print(f"\ndistllm generate: {exc}", file=sys.stderr)
        return 1
    return 0


async def _main(args: argparse.Namespace, peers: list[PeerAddress]) -> None:
    from distllm.client import Client, ClientConfig

    async with Client(peers, config=ClientConfig(relay=not args.no_relay)) as client:
        model = await client.model(args.model)
        prompt_ids = encode_prompt(model, args.prompt, chat=args.chat)
        await stream_answer(
            model,
            prompt_ids,
            args.max_new_tokens,
            sampling_kwargs(args),
            out=sys.stdout,
            info=sys.stderr,
        )


def encode_prompt(model: RemoteModel, prompt: str, *, chat: bool) -> Any:
    """Token ids ``[1, T]`` of ``prompt`` (in the chat template with ``chat``)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {model.name!r} has no tokenizer")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {model.name!r} has no chat template")
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    tokens: int  # generated
    first_token_seconds: float  # the prompt's step: time to the first new token
    seconds: float  # to the last token

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first one, per second (the decoding speed)."""
        decode = self.seconds - self.first_token_seconds
        return (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0


async def stream_answer(
    model: RemoteModel,
    prompt_ids: Any,
    max_new_tokens: int,
    sampling: dict[str, Any],
    *,
    out: TextIO,
    info: TextIO | None = None,
) -> Answer:
    """Generate after ``prompt_ids`` ``[1, T]`` in a session of its own, writing the text to
    ``out`` as it comes; the route and the speed go to ``info``."""
    from distllm.client.generation import SamplingParams, TextStream, generate_ids

    prompt_tokens = int(prompt_ids.shape[1])
    pieces: list[str] = []

    def write(piece: str) -> None:
        pieces.append(piece)
        out.write(piece)
        out.flush()

    async with ready_session(model, prompt_tokens + max_new_tokens) as session:
        if info is not None:
            print(describe_route(session), file=info, flush=True)
        text = TextStream(model.tokenizer, prompt_ids[0].tolist())
        started = time.perf_counter()
        first = 0.0
        tokens = 0
        params = SamplingParams(**sampling)
        async for token in generate_ids(session, prompt_ids, max_new_tokens, params):
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - started
            write(text.push(int(token[0])))
        seconds = time.perf_counter() - started
        write(text.flush())
    out.write("\n")
    answer = Answer("".join(pieces), prompt_tokens, tokens, first, seconds)
    if info is not None:
        print(
            f"{answer.tokens} tokens: the first after {answer.first_token_seconds:.2f} s"
            f" (prompt of {prompt_tokens} tokens), then"
            f" {answer.decode_tokens_per_second:.1f} tokens/s",
            file=info,
            flush=True,
        )
    return answer


@asynccontextmanager
async def ready_session(model: RemoteModel, max_length: int) -> AsyncIterator[InferenceSession]:
    """A session, once the swarm serves every block (servers may still be announcing)."""
    import anyio

    from distllm.client.errors import NoRouteError

    deadline = anyio.current_time() + ROUTE_TIMEOUT
    async with AsyncExitStack() as stack:
        while True:
            try:
                session = await stack.enter_async_context(
                    model.inference_session(max_length=max_length)
                )
                break
            except NoRouteError:
                if anyio.current_time() > deadline:
                    raise
                await anyio.sleep(0.5)
                await model.refresh()
        yield session


def describe_route(session: InferenceSession) -> str:
    """One line per hop: which server computes which blocks."""
    lines = ["route:"]
    for hop in session.route:
        address = hop.address
        lines.append(
            f"  blocks {hop.start:>3}..{hop.end - 1:<3} on {hop.peer.short} "
            f"({address.host}:{address.port})"
        )
    return "\n".join(lines)
