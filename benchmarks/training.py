"""Forward and backward through a swarm vs the same model local in transformers.

One run on this machine: SmolLM2-135M-Instruct (30 blocks, fp32) split over 3 ``distllm serve``
processes talking QUIC over loopback, against the same model in local ``transformers`` with its
weights frozen (as on the servers). A batch of 8 x 128 tokens of input embeddings:

* **forward**: the blocks' outputs, no gradients (``RemoteModel.forward`` vs
  ``model.model(inputs_embeds=...)`` under ``torch.no_grad``);
* **train step**: forward with autograd, then backward of a random output gradient down to the
  inputs (what prompt tuning does each step). Distributed, twice: with the servers keeping each
  forward's autograd graph for its backward (``forward_id``; distllm's default), and with every
  backward recomputing its span's forward first (what Petals does).

Tokens/s count the batch's tokens (8 x 128) per second. The local baseline runs before and after
the distributed runs and the better rate is kept (so a busy neighbour cannot flatter the ratio).

    python benchmarks/training.py            # full run
    python benchmarks/training.py --quick    # fewer repeats

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch

from distllm.cli.loopback import COLOCATED_ENV, LoopbackSwarm, even_spans
from distllm.client import Client, ClientConfig
from distllm.client.autograd import traced_backward, traced_forward
from distllm.config import TransportConfig
from distllm.model.resolve import DEFAULT_MODEL, resolve_model


@dataclass
class Row:
    what: str
    local: float  # tokens/s
    distributed: float

    @property
    def ratio(self) -> float:
        return self.distributed / self.local


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, help="measurements per row (best is kept)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per server")
    parser.add_argument(
        "--max-datagram-size",
        type=int,
        default=16384,
        help="QUIC datagram size of the client and servers (16384: loopback; 1200: any path)",
    )
    parser.add_argument(
        "--sub-batch-tokens",
        type=int,
        default=ClientConfig().max_forward_tokens,
        help="client's max_forward_tokens: larger batches are split into concurrent sub-batches",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


# -- local baseline ---------------------------------------------------------------------------


def local_forward(model: Any, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.model(inputs_embeds=x)


def local_train_step(model: Any, x: torch.Tensor, g: torch.Tensor) -> None:
    leaf = x.detach().requires_grad_(True)
    out = model.model(inputs_embeds=leaf).last_hidden_state
    out.backward(g)


def best_rate(tokens: int, repeats: int, step: Callable[[], None]) -> float:
    step()  # warm up: allocator, kernels for these shapes
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return tokens / min(times)


def local_rates(model: Any, x: torch.Tensor, g: torch.Tensor, repeats: int) -> dict[str, float]:
    tokens = x.shape[0] * x.shape[1]
    return {
        "forward": best_rate(tokens, repeats, partial(local_forward, model, x)),
        "train": best_rate(tokens, repeats, partial(local_train_step, model, x, g)),
    }


# -- distributed ------------------------------------------------------------------------------


async def best_async_rate(tokens: int, repeats: int, step: Callable[[], Awaitable[Any]]) -> float:
    await step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await step()
        times.append(time.perf_counter() - started)
    return tokens / min(times)


async def train_step(remote: Any, x: torch.Tensor, g: torch.Tensor, keep_graph: bool) -> None:
    _, trace = await traced_forward(remote, x, keep_graph=keep_graph)
    await traced_backward(remote, trace, g)


async def distributed_rates(
    args: argparse.Namespace, path: Path, swarm: LoopbackSwarm, x: torch.Tensor, g: torch.Tensor
) -> dict[str, float]:
    tokens = x.shape[0] * x.shape[1]
    config = ClientConfig(step_timeout=120.0, max_forward_tokens=args.sub_batch_tokens)
    size = args.max_datagram_size
    transport = TransportConfig(max_datagram_size=size, loopback_datagram_size=size)
    async with Client(swarm.initial_peers, config=config, transport_config=transport) as client:
        remote = await client.model(path)
        return {
            "forward": await best_async_rate(tokens, args.repeats, partial(remote.forward, x)),
            "train": await best_async_rate(
                tokens, args.repeats, partial(train_step, remote, x, g, True)
            ),
            "train, recompute": await best_async_rate(
                tokens, args.repeats, partial(train_step, remote, x, g, False)
            ),
        }


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    model = resolve_model(DEFAULT_MODEL)
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    local.requires_grad_(False)  # frozen, as the servers' weights are
    num_blocks = int(local.config.num_hidden_layers)
    spans = even_spans(num_blocks, args.servers)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, int(local.config.hidden_size))
    x = torch.randn(shape, generator=generator) * 0.02
    g = torch.randn(shape, generator=generator)
    with (
        tempfile.TemporaryDirectory(prefix="distllm-bench-") as tmp,
        LoopbackSwarm(Path(tmp), env=COLOCATED_ENV) as swarm,
    ):
        swarm.start_dht()
        extra = ("--no-measure", "--num-threads", str(args.threads))
        size = str(args.max_datagram_size)
        extra += ("--max-datagram-size", size, "--loopback-datagram-size", size)
        for span in spans:
            swarm.add_server(model.path, span, name=model.name, extra=extra)
        swarm.wait_ready()
        before = local_rates(local, x, g, args.repeats)
        remote = anyio.run(
            partial(distributed_rates, args, model.path, swarm, x, g), backend=args.backend
        )
        after = local_rates(local, x, g, args.repeats)
    best = {k: max(before[k], after[k]) for k in before}
    rows = [
        Row("forward", best["forward"], remote["forward"]),
        Row("forward + backward (kept graphs)", best["train"], remote["train"]),
        Row("forward + backward (recompute, as Petals)", best["train"], remote["train, recompute"]),
    ]
    layout = " + ".join(f"[{a},{b})" for a, b in spans)
    print(
        f"\n{model.name}, {num_blocks} blocks, fp32, batch {args.batch} x {args.length} tokens;"
        f" servers {layout}, {args.threads} threads each; QUIC datagrams of"
        f" {args.max_datagram_size} B; sub-batches of <= {args.sub_batch_tokens} tokens;"
        f" local: {torch.get_num_threads()} threads; best of {args.repeats}\n"
    )
    print("| pass | local tok/s | distributed tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row.what} | {row.local:.0f} | {row.distributed:.0f} | {row.ratio:.2f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
