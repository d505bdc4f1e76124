"""Span server benchmark: continuous batching vs one-at-a-time, paged vs full-length admission.

1. Aggregate decode tokens/s of 1, 4 and 16 concurrent sessions on one server, with steps of
   concurrent sessions batched into one forward (distllm) and with every step run alone, one at
   a time (how Petals schedules: ``max_batch_sessions=1``). Same server code, same model.
2. Sessions of mixed lengths admitted into a fixed KV cache budget: pages reserved as sessions
   grow (distllm) vs ``max_length`` reserved up front (how Petals admits:
   ``reserve_max_length=True``).

Clients and server share one process over the in-memory transport (no network cost), so the
numbers are the server's own. Prints a table; asserts nothing.

    python benchmarks/server.py            # full run
    python benchmarks/server.py --quick    # well under 90 s
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import numpy as np

from distllm.errors import Busy
from distllm.ids import PeerAddress
from distllm.protocol import (
    METHOD_INFERENCE,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
)
from distllm.rpc import RpcEndpoint, RpcStream
from distllm.server.config import ServerConfig
from distllm.server.server import Server
from distllm.testing import memory_rpc_endpoints
from distllm.testing.models import make_tiny_model
from distllm.wire.tensors import WireTensor

MODEL = "bench-llama"
HIDDEN = 512
BLOCKS = 8
_ids = itertools.count()


@dataclass
class DecodeResult:
    sessions: int
    tokens_per_s: float
    step_calls: int
    steps: int


def make_model(root: Path) -> Path:
    return make_tiny_model(
        "llama",
        root / "llama",
        hidden_size=HIDDEN,
        intermediate_size=3 * HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        with_tokenizer=False,
    )


def hidden(rng: np.random.Generator, rows: int, tokens: int) -> WireTensor:
    return WireTensor.from_numpy(rng.standard_normal((rows, tokens, HIDDEN), dtype=np.float32))


async def open_session(stream: RpcStream, max_length: int) -> None:
    session_id = b"bench-%d" % next(_ids)
    await stream.send(InferenceOpen(MODEL, 0, BLOCKS, max_length, 1, session_id, "float32", None))
    with anyio.fail_after(60):
        await stream.receive_as(InferenceOpened)


async def step(stream: RpcStream, tensor: WireTensor) -> None:
    await stream.send(InferenceStep(tensor, None, None, None, 0))
    with anyio.fail_after(120):
        await stream.receive_as(InferenceOutput)


async def decode_run(
    rpc: RpcEndpoint, server: PeerAddress, sessions: int, prompt: int, steps: int
) -> float:
    """Aggregate decode tokens/s of ``sessions`` sessions decoding ``steps`` tokens each."""
    ready = 0
    all_ready = anyio.Event()
    times: list[tuple[float, float]] = []

    async def one(index: int) -> None:
        nonlocal ready
        rng = np.random.default_rng(index)
        tokens = [hidden(rng, 1, 1) for _ in range(steps)]
        async with rpc.open_stream(server, METHOD_INFERENCE) as stream:
            await open_session(stream, prompt + steps)
            await step(stream, hidden(rng, 1, prompt))
            ready += 1
            if ready == sessions:
                all_ready.set()
            await all_ready.wait()
            began = time.perf_counter()
            for token in tokens:
                await step(stream, token)
            times.append((began, time.perf_counter()))

    async with anyio.create_task_group() as tg:
        for index in range(sessions):
            tg.start_soon(one, index)
    elapsed = max(end for _, end in times) - min(start for start, _ in times)
    return sessions * steps / elapsed


async def decode_table(
    path: Path, config: ServerConfig, counts: list[int], prompt: int, steps: int
) -> list[DecodeResult]:
    results = []
    async with (
        memory_rpc_endpoints(2) as (server_rpc, client_rpc),
        Server(server_rpc, path, MODEL, 0, BLOCKS, config=config) as server,
    ):
        await decode_run(client_rpc, server_rpc.address, 2, 8, 4)  # warm-up
        for count in counts:
            calls_before = server.compute.step_calls
            chunks_before = server.compute.stats.inference_chunks
            rate = await decode_run(client_rpc, server_rpc.address, count, prompt, steps)
            results.append(
                DecodeResult(
                    count,
                    rate,
                    server.compute.step_calls - calls_before,
                    server.compute.stats.inference_chunks - chunks_before,
                )
            )
    return results


async def admitted(path: Path, config: ServerConfig, lengths: list[int], max_length: int) -> int:
    """How many of the sessions (opened in order, each kept open) get all their tokens in."""
    count = 0
    rng = np.random.default_rng(0)
    async with (
        memory_rpc_endpoints(2) as (server_rpc, client_rpc),
        Server(server_rpc, path, MODEL, 0, BLOCKS, config=config),
        AsyncExitStack() as sessions,
    ):
        for length in lengths:
            try:
                async with AsyncExitStack() as attempt:
                    stream = await attempt.enter_async_context(
                        client_rpc.open_stream(server_rpc.address, METHOD_INFERENCE)
                    )
                    await open_session(stream, max_length)
                    await step(stream, hidden(rng, 1, length))
                    await sessions.enter_async_context(attempt.pop_all())
                    count += 1
            except Busy:
                pass
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (well under 90 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    steps = 16 if args.quick else 64
    prompt = 32
    counts = [1, 4, 16]
    base = ServerConfig(cache_tokens=16384, num_threads=args.threads)
    batched = base
    one_at_a_time = replace(base, max_batch_sessions=1, batch_window=0.0)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp))
        print(
            f"model: Llama, hidden {HIDDEN}, {BLOCKS} blocks, fp32; server: {args.threads} "
            f"torch thread(s); prompt {prompt} tokens, then {steps} decode steps per session"
        )
        fast = anyio.run(decode_table, path, batched, counts, prompt, steps)
        slow = anyio.run(decode_table, path, one_at_a_time, counts, prompt, steps)
        print()
        print("| sessions | batched tok/s | one-at-a-time tok/s | ratio | steps per forward |")
        print("|---:|---:|---:|---:|---:|")
        for f, s in zip(fast, slow, strict=True):
            per_call = f.steps / max(f.step_calls, 1)
            print(
                f"| {f.sessions} | {f.tokens_per_s:.0f} | {s.tokens_per_s:.0f} | "
                f"{f.tokens_per_s / s.tokens_per_s:.2f}x | {per_call:.1f} |"
            )

        budget, max_length = 8192, 2048
        lengths = [int(n) for n in np.random.default_rng(1).integers(16, 1024, size=64)]
        paged = replace(base, cache_tokens=budget, max_length=max_length)
        full = replace(paged, reserve_max_length=True)
        n_paged = anyio.run(admitted, path, paged, lengths, max_length)
        n_full = anyio.run(admitted, path, full, lengths, max_length)
        print()
        print(
            f"admission: cache {budget} tokens, max_length {max_length}, {len(lengths)} sessions "
            f"of {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}) in order"
        )
        print()
        print("| reservation | sessions admitted | ratio |")
        print("|---|---:|---:|")
        print(f"| paged (as sessions grow) | {n_paged} | {n_paged / max(n_full, 1):.2f}x |")
        print(f"| full max_length up front | {n_full} | 1.00x |")


if __name__ == "__main__":
    main()
