"""Inference through a swarm vs the same model local in transformers; failover recovery.

One run on this machine: SmolLM2-135M-Instruct (30 blocks, fp32) split over 3 ``distllm serve``
processes talking QUIC over loopback (plus a standby server for the middle span), against the
same model in local ``transformers``:

* decode tokens/s (batch 1, greedy) after a 128- and a 1024-token context, and the ratio
  distributed / local -- with server-to-server relay (the default: each server sends its output
  straight on to the next one) and hop by hop (the client forwards every hop's output, as
  Petals does);
* failover: the server computing the middle span is killed (SIGKILL) mid-generation at a
  1024-token context; recovery is the time from the kill to the next token (the session bans
  it, reroutes to the standby, replays the 1024 positions there, and carries on).
  The tokens after the failure are compared with those of a run without one.

The client runs in a process of its own and, like the servers, with libgomp's spin-wait
shortened (``GOMP_SPINCOUNT=50000``): all of them share this machine's 2 cores, and a process
spinning after its matmuls takes a core from the one computing next. Local ``transformers``
runs alone, in this process, with libgomp's defaults (which suit it best).

    python benchmarks/inference.py                # full run
    python benchmarks/inference.py --quick        # < 120 s
    python benchmarks/inference.py --delay-ms 10  # every datagram 10 ms late (userspace
                                                  # netem: benchmarks/udp_delay)

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch

from distllm.cli.loopback import COLOCATED_ENV, LoopbackSwarm, even_spans
from distllm.client import Client, ClientConfig
from distllm.config import TransportConfig
from distllm.model.resolve import DEFAULT_MODEL, resolve_model

#: The delay in ms, set for the re-run of this script with delayed UDP (``udp_delay/``).
_DELAY_ENV = "DISTLLM_BENCH_UDP_DELAY_MS"


@dataclass
class Decode:
    context: int
    local: float  # tokens/s
    distributed: float  # with server-to-server relay
    hop_by_hop: float  # without

    @property
    def ratio(self) -> float:
        return self.distributed / self.local

    @property
    def hop_by_hop_ratio(self) -> float:
        return self.hop_by_hop / self.local


@dataclass
class Failover:
    context: int
    recovery: float  # seconds from the kill to the next token
    repair: float  # of which: from the failure's detection to the next token
    replayed: int  # positions replayed to the standby
    identical: bool  # tokens equal those of a run without failure
    detection: str


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (<120 s)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--tokens", type=int, help="decoded tokens per measurement")
    parser.add_argument("--repeats", type=int, help="measurements per context (best is kept)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per server")
    parser.add_argument(
        "--dead-peer-timeout",
        type=float,
        default=TransportConfig().dead_peer_timeout,
        help="client's QUIC dead-peer timeout (default: the transport's)",
    )
    parser.add_argument(
        "--suspect-after",
        type=float,
        default=ClientConfig().suspect_after,
        help="probe a step's server after this many seconds without an answer (client default)",
    )
    parser.add_argument(
        "--default-omp-spin",
        action="store_true",
        help="leave libgomp's long spin-wait on in the servers and the client (co-located,"
        " they then slow each other down)",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="one-way delay of every UDP datagram between the processes (each process sends"
        " its datagrams this late: benchmarks/udp_delay, a userspace netem)",
    )
    args = parser.parse_args()
    args.tokens = args.tokens or (24 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


# -- local baseline ---------------------------------------------------------------------------


def local_decode_rate(model: Any, context: int, tokens: int) -> float:
    """Greedy decode tokens/s after a prefill of ``context`` random tokens, with a KV cache."""
    ids = torch.randint(10, model.config.vocab_size, (1, context))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - started)


# -- distributed ------------------------------------------------------------------------------


async def decode_steps(session: Any, parts: Any, token: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy steps from ``token`` ``[1, 1]``; the tokens produced."""
    produced = []
    for _ in range(n):
        with torch.no_grad():
            out = await session.step(parts.embed(token))
            token = parts.logits(out[:, -1:]).argmax(-1)
        produced.append(int(token))
    return produced


async def prefill(session: Any, parts: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = await session.step(parts.embed(ids))
        token: torch.Tensor = parts.logits(out[:, -1:]).argmax(-1)
    return token


async def distributed_decode_rate(remote: Any, context: int, tokens: int) -> float:
    ids = torch.randint(10, remote.config.vocab_size, (1, context))
    async with remote.inference_session(max_length=context + tokens + 1) as session:
        token = await prefill(session, remote.parts, ids)
        started = time.perf_counter()
        await decode_steps(session, remote.parts, token, tokens)
        return tokens / (time.perf_counter() - started)


async def failover(remote: Any, servers: dict[str, int], context: int, detection: str) -> Failover:
    """Kill the server of the middle hop after a few tokens; time the next token."""
    ids = torch.randint(10, remote.config.vocab_size, (1, context))
    before, after = 4, 8
    async with remote.inference_session(max_length=context + before + after + 2) as session:
        token = await prefill(session, remote.parts, ids)
        expected = await decode_steps(session, remote.parts, token, before + after)
    async with remote.inference_session(max_length=context + before + after + 2) as session:
        token = await prefill(session, remote.parts, ids)
        got = await decode_steps(session, remote.parts, token, before)
        victim = _pid_of(servers, session.route[len(session.route) // 2].peer.short)
        last = torch.tensor([[got[-1]]])
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)  # the server vanishes without a word
        got += await decode_steps(session, remote.parts, last, 1)
        recovery = time.perf_counter() - killed
        got += await decode_steps(session, remote.parts, torch.tensor([[got[-1]]]), after - 1)
        repairs = session.stats.recovery_seconds
        return Failover(
            context,
            recovery,
            repairs[-1] if repairs else float("nan"),
            session.stats.replayed_tokens,
            got == expected,
            detection,
        )


def _pid_of(servers: dict[str, int], peer_short: str) -> int:
    for address, pid in servers.items():
        if peer_short in address:
            return pid
    raise LookupError(f"no server process with peer {peer_short}")


def local_rates(args: argparse.Namespace, local: Any) -> dict[int, float]:
    """Best local decode rate per context (with no event loop running in this process)."""
    for context in args.contexts:  # warm up: allocator, kernels for these shapes
        local_decode_rate(local, context, 8)
    return {
        c: max(local_decode_rate(local, c, args.tokens) for _ in range(args.repeats))
        for c in args.contexts
    }


async def run_client(
    args: argparse.Namespace, path: Path, peers: list[str], servers: dict[str, int]
) -> tuple[dict[int, float], dict[int, float], Failover]:
    """Best distributed decode rate per context, with relay and hop by hop; then the failover
    measurement (with relay, the default)."""
    transport = TransportConfig(
        keepalive_interval=min(0.5, args.dead_peer_timeout / 4),
        dead_peer_timeout=args.dead_peer_timeout,
    )
    configs = {
        relay: ClientConfig(step_timeout=30.0, suspect_after=args.suspect_after, relay=relay)
        for relay in (True, False)
    }
    rates: dict[bool, dict[int, float]] = {True: {}, False: {}}
    async with (
        Client(peers, transport_config=transport, config=configs[True]) as relaying,
        Client(peers, transport_config=transport, config=configs[False]) as hop_by_hop,
    ):
        remotes = {True: await relaying.model(path), False: await hop_by_hop.model(path)}
        for context in args.contexts:  # warm up: connections, allocators, kernels
            for remote in remotes.values():
                await distributed_decode_rate(remote, context, 8)
        for context in args.contexts:
            runs: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):  # interleaved: drifts in machine speed hit both
                for relay, remote in remotes.items():
                    runs[relay].append(await distributed_decode_rate(remote, context, args.tokens))
            for relay in remotes:
                rates[relay][context] = max(runs[relay])
        config = configs[True]
        detection = (
            f"liveness probes after {config.suspect_after:g} s (timeout"
            f" {config.probe_timeout:g} s), QUIC dead-peer timeout {args.dead_peer_timeout:g} s"
        )
        result = await failover(remotes[True], servers, max(args.contexts), detection)
    return rates[True], rates[False], result


def client_process(
    args: argparse.Namespace, path: Path, peers: list[str], servers: dict[str, int]
) -> tuple[dict[int, float], dict[int, float], dict[str, Any]]:
    """The client, in a process of its own (started with the co-located OpenMP settings)."""
    relayed, hop_by_hop, fail = anyio.run(
        partial(run_client, args, path, peers, servers), backend=args.backend
    )
    return relayed, hop_by_hop, dataclasses.asdict(fail)


def run_client_process(
    args: argparse.Namespace, path: Path, swarm: LoopbackSwarm
) -> tuple[dict[int, float], dict[int, float], Failover]:
    """Run :func:`client_process` in a new process whose OpenMP workers spin briefly, as the
    servers' do: a client's matmuls (the LM head) are followed by waiting on the network, and
    a long spin there takes a core from the server computing the next hop (about 5 ms a token
    here). Local transformers, in this process, keeps libgomp's defaults, which suit it best."""
    servers = {s.address: s.process.pid for s in swarm.servers if s.address is not None}
    env = {} if args.default_omp_spin else dict(COLOCATED_ENV)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned process takes the environment of this moment
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            relayed, hop_by_hop, fail = pool.apply(
                client_process, (args, path, swarm.initial_peers, servers)
            )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return relayed, hop_by_hop, Failover(**fail)


def run_with_delay(args: argparse.Namespace) -> int:
    """Run this script again with every UDP datagram of every process delayed by
    ``--delay-ms`` (``benchmarks/udp_delay``: a userspace netem; a round trip takes twice it)."""
    here = Path(__file__).resolve().parent / "udp_delay"
    path = os.pathsep.join(p for p in (str(here), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, _DELAY_ENV: f"{args.delay_ms:g}"}
    return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode


def main() -> int:
    args = parse_args()
    if args.delay_ms and not os.environ.get(_DELAY_ENV):
        return run_with_delay(args)
    started = time.perf_counter()
    model = resolve_model(DEFAULT_MODEL)
    from distllm.model import load_config

    num_blocks = int(load_config(model.path).num_hidden_layers)
    spans = even_spans(num_blocks, args.servers)
    standby = spans[len(spans) // 2]

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    with (
        tempfile.TemporaryDirectory(prefix="distllm-bench-") as tmp,
        LoopbackSwarm(Path(tmp), env=None if args.default_omp_spin else COLOCATED_ENV) as swarm,
    ):
        swarm.start_dht()
        extra = ("--no-measure", "--num-threads", str(args.threads), "--cache-tokens", "8192")
        for span in [*spans, standby]:
            swarm.add_server(model.path, span, name=model.name, extra=extra)
        swarm.wait_ready()
        # Local runs before and after the distributed ones, best kept: load from other
        # processes on this machine during either does not decide the ratio.
        before = local_rates(args, local)
        relayed, hop_by_hop, fail = run_client_process(args, model.path, swarm)
        after = local_rates(args, local)
    decodes = [
        Decode(c, max(before[c], after[c]), relayed[c], hop_by_hop[c]) for c in args.contexts
    ]
    report(args, model.name, num_blocks, spans, decodes, fail, time.perf_counter() - started)
    return 0


def report(
    args: argparse.Namespace,
    name: str,
    num_blocks: int,
    spans: list[tuple[int, int]],
    decodes: list[Decode],
    fail: Failover | None,
    seconds: float,
) -> None:
    layout = " + ".join(f"[{a},{b})" for a, b in spans)
    print(
        f"\n{name}, {num_blocks} blocks, fp32, batch 1, greedy; {args.tokens} tokens x"
        f" {args.repeats} (best); servers {layout} + standby, {args.threads} threads each"
        f"; client in its own process; servers and client"
        f" {'with the default OpenMP spin' if args.default_omp_spin else 'GOMP_SPINCOUNT=50000'};"
        f" local: {torch.get_num_threads()} threads, default spin"
        + (f"; every datagram delayed {args.delay_ms:g} ms" if args.delay_ms else "")
        + "\n"
    )
    print(
        "| context | local tok/s | distributed tok/s (relay) | ratio |"
        " hop by hop tok/s | ratio | relay speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d in decodes:
        print(
            f"| {d.context} | {d.local:.1f} | {d.distributed:.1f} | {d.ratio:.2f} |"
            f" {d.hop_by_hop:.1f} | {d.hop_by_hop_ratio:.2f} |"
            f" {d.distributed / d.hop_by_hop:.2f}x |"
        )
    if fail is not None:
        print(
            f"\nfailover at a {fail.context}-token context ({fail.detection}): server killed"
            f" -> next token {fail.recovery:.2f} s (detection {fail.recovery - fail.repair:.2f}"
            f" s, then reroute + replay + step {fail.repair:.2f} s); {fail.replayed} positions"
            " replayed;"
            f" tokens identical to a run without failure: {'yes' if fail.identical else 'NO'}"
        )
    ratios = [d.ratio for d in decodes]
    print(f"\nmean ratio {statistics.mean(ratios):.2f}; total {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
