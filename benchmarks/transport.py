"""Loopback benchmark of distllm's QUIC transport beside stock aioquic.asyncio and plain TCP.

For every path: median and p99 round trip of a 64 B and a 16 KiB request (echoed back), and bulk
throughput of one stream (client -> server). The server side runs in its own process so the two
sides do not share one core. Prints a table; asserts nothing.

    python benchmarks/transport.py            # full: 2000 round trips, 64 MiB bulk, 3 repeats
    python benchmarks/transport.py --quick    # under a minute: 300, 32 MiB, 1 repeat

With repeats, each figure is the median over the repeats (loopback figures on a shared machine
vary by tens of percent from run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import ssl
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from distllm.config import TransportConfig
from distllm.identity import Identity
from distllm.ids import PeerAddress
from distllm.transport.quic import QuicEndpoint
from distllm.transport.tls import make_certificate

HEADER = struct.Struct("!cQ")  # mode (b"E" echo, b"B" bulk sink), size
COUNT = struct.Struct("!Q")
CHUNK = 1024 * 1024
BIG_READ = 1024 * 1024
STOCK_ALPN = "bench"
SIZES = (64, 16384)
MiB = 1024 * 1024
WINDOW = 8 * MiB


@dataclasses.dataclass
class Result:
    path: str
    datagram: str
    backend: str
    rtt: dict[int, tuple[float, float]]  # size -> (median ms, p99 ms)
    bulk_mbps: float
    bulk_range: tuple[float, float] = (0.0, 0.0)  # min, max over repeats


# -- the protocol, over any anyio ByteStream ---------------------------------------------------


class Reader:
    def __init__(self, receive: Callable[[], Awaitable[bytes]]) -> None:
        self._receive = receive
        self._buffer = bytearray()

    async def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += await self._receive()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


async def serve_stream(stream: anyio.abc.ByteStream) -> None:
    reader = Reader(stream.receive)
    mode, size = HEADER.unpack(await reader.exactly(HEADER.size))
    try:
        if mode == b"E":
            while True:
                await stream.send(await reader.exactly(size))
        total = len(reader._buffer)
        while True:
            total += len(await stream.receive(BIG_READ))
    except anyio.EndOfStream:
        if mode == b"B":
            await stream.send(COUNT.pack(total))
        await stream.send_eof()


async def measure_rtt(stream: anyio.abc.ByteStream, size: int, rounds: int) -> tuple[float, float]:
    reader = Reader(stream.receive)
    await stream.send(HEADER.pack(b"E", size))
    payload = os.urandom(size)
    samples = []
    for i in range(rounds + rounds // 10):
        start = time.perf_counter()
        await stream.send(payload)
        await reader.exactly(size)
        if i >= rounds // 10:  # the first tenth warms up
            samples.append(time.perf_counter() - start)
    await stream.send_eof()  # a clean end, so the server sees no reset
    with contextlib.suppress(anyio.EndOfStream):
        await stream.receive()
    return summarize(samples)


async def measure_bulk(stream: anyio.abc.ByteStream, total: int) -> float:
    chunk = os.urandom(CHUNK)
    start = time.perf_counter()
    await stream.send(HEADER.pack(b"B", 0))
    for _ in range(total // CHUNK):
        await stream.send(chunk)
    await stream.send_eof()
    (count,) = COUNT.unpack(await Reader(stream.receive).exactly(COUNT.size))
    elapsed = time.perf_counter() - start
    assert count == total // CHUNK * CHUNK, count
    return count / elapsed / 1e6


def summarize(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples) * 1e3, p99 * 1e3


# -- servers (each runs in a child process) ----------------------------------------------------


def quic_config(datagram: int) -> TransportConfig:
    return TransportConfig(
        max_datagram_size=datagram,
        loopback_datagram_size=datagram,  # this measures the size asked for, on loopback too
        stream_send_window=WINDOW,
        stream_receive_window=WINDOW,
    )


async def serve_distllm(datagram: int) -> None:
    async with QuicEndpoint(Identity.generate(), config=quic_config(datagram)) as endpoint:
        endpoint.set_stream_handler(serve_stream)  # type: ignore[arg-type]
        print(endpoint.address, flush=True)
        await anyio.sleep_forever()


async def serve_tcp() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        print(f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}", flush=True)
        await listener.serve(serve_stream)


def stock_configuration(is_client: bool, datagram: int) -> object:
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(
        is_client=is_client, alpn_protocols=[STOCK_ALPN], max_datagram_size=datagram
    )
    if is_client:
        config.verify_mode = ssl.CERT_NONE
    else:
        identity = Identity.generate()
        config.certificate = make_certificate(identity)
        config.private_key = identity.private_key
    return config


class StockStream(anyio.abc.ByteStream):
    """aioquic.asyncio's reader/writer pair seen as a ByteStream (the protocol code is shared)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.reader.read(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        self.writer.write(item)
        await self.writer.drain()

    async def send_eof(self) -> None:
        self.writer.write_eof()

    async def aclose(self) -> None:
        self.writer.close()


async def serve_stock(datagram: int) -> None:
    from aioquic.asyncio import serve

    tasks = set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve_stream(StockStream(reader, writer)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await serve(
        "127.0.0.1",
        0,
        configuration=stock_configuration(False, datagram),  # type: ignore[arg-type]
        stream_handler=on_stream,
    )
    print(f"127.0.0.1:{server._transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.Event().wait()


# -- clients -----------------------------------------------------------------------------------


async def client_distllm(address: str, datagram: int, rounds: int, bulk: int) -> Result:
    rtt = {}
    async with QuicEndpoint(Identity.generate(), config=quic_config(datagram)) as endpoint:
        peer = PeerAddress.parse(address)
        for size in SIZES:
            async with await endpoint.open_stream(peer) as stream:
                rtt[size] = await measure_rtt(stream, size, rounds)
        async with await endpoint.open_stream(peer) as stream:
            mbps = await measure_bulk(stream, bulk)
    return Result("distllm QUIC", str(datagram), anyio_backend_name(), rtt, mbps)


async def client_tcp(address: str, rounds: int, bulk: int) -> Result:
    host, port = address.rsplit(":", 1)
    rtt = {}
    for size in SIZES:
        async with await anyio.connect_tcp(host, int(port)) as stream:
            rtt[size] = await measure_rtt(stream, size, rounds)
    async with await anyio.connect_tcp(host, int(port)) as stream:
        mbps = await measure_bulk(stream, bulk)
    return Result("anyio TCP", "-", anyio_backend_name(), rtt, mbps)


async def client_stock(address: str, datagram: int, rounds: int, bulk: int) -> Result:
    from aioquic.asyncio import connect

    host, port = address.rsplit(":", 1)
    config = stock_configuration(True, datagram)
    rtt = {}
    async with connect(host, int(port), configuration=config) as client:  # type: ignore[arg-type]
        for size in SIZES:
            rtt[size] = await measure_rtt(StockStream(*await client.create_stream()), size, rounds)
        mbps = await measure_bulk(StockStream(*await client.create_stream()), bulk)
    return Result("stock aioquic.asyncio", str(datagram), "asyncio", rtt, mbps)


def anyio_backend_name() -> str:
    try:
        import sniffio

        return sniffio.current_async_library()
    except Exception:
        return "?"


# -- orchestration -----------------------------------------------------------------------------


def start_server(kind: str, backend: str, datagram: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, __file__, "--serve", kind, "--backend", backend]
    command += ["--datagram", str(datagram)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    address = process.stdout.readline().strip()
    if not address:
        process.kill()
        raise RuntimeError(f"server {kind} did not start")
    return process, address


def run_one(kind: str, backend: str, datagram: int, rounds: int, bulk: int) -> Result:
    process, address = start_server(kind, backend, datagram)
    try:
        if kind == "distllm":
            return anyio.run(client_distllm, address, datagram, rounds, bulk, backend=backend)
        if kind == "tcp":
            return anyio.run(client_tcp, address, rounds, bulk, backend=backend)
        return asyncio.run(client_stock(address, datagram, rounds, bulk))
    finally:
        process.kill()
        process.wait()


def serve_main(kind: str, backend: str, datagram: int) -> None:
    if kind == "distllm":
        anyio.run(serve_distllm, datagram, backend=backend)
    elif kind == "tcp":
        anyio.run(serve_tcp, backend=backend)
    else:
        asyncio.run(serve_stock(datagram))


def merge(results: list[Result]) -> Result:
    """The median of each figure over repeated runs of one path."""
    first = results[0]
    rtt = {
        size: (
            statistics.median(r.rtt[size][0] for r in results),
            statistics.median(r.rtt[size][1] for r in results),
        )
        for size in SIZES
    }
    bulks = [r.bulk_mbps for r in results]
    return dataclasses.replace(
        first, rtt=rtt, bulk_mbps=statistics.median(bulks), bulk_range=(min(bulks), max(bulks))
    )


def print_table(results: list[Result]) -> None:
    stock = {r.datagram: r for r in results if r.path.startswith("stock")}
    header = (
        f"{'path':<22} {'dgram':>6} {'backend':<8} {'64B med':>8} {'64B p99':>8} "
        f"{'16K med':>8} {'16K p99':>8} {'bulk MB/s':>10} {'(min-max)':>11} "
        f"{'bulk/stock':>10} {'16K/stock':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ref = stock.get(r.datagram) if r.path.startswith("distllm") else None
        bulk_ratio = f"{r.bulk_mbps / ref.bulk_mbps:.2f}x" if ref else ""
        rtt_ratio = f"{r.rtt[16384][0] / ref.rtt[16384][0]:.2f}x" if ref else ""
        low, high = r.bulk_range
        spread = f"{low:.0f}-{high:.0f}" if high else ""
        print(
            f"{r.path:<22} {r.datagram:>6} {r.backend:<8} "
            f"{r.rtt[64][0]:>8.3f} {r.rtt[64][1]:>8.3f} {r.rtt[16384][0]:>8.3f} "
            f"{r.rtt[16384][1]:>8.3f} {r.bulk_mbps:>10.1f} {spread:>11} "
            f"{bulk_ratio:>10} {rtt_ratio:>9}"
        )
    print(
        "round trips in ms; MB = 10^6 bytes; ratios are distllm / stock at equal datagram size"
        " (bulk: higher is better; 16K round trip: lower is better)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 rounds, 32 MiB, once (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None, help="round trips per size")
    parser.add_argument("--bulk-mb", type=int, default=None, help="bulk transfer size in MiB")
    parser.add_argument("--repeat", type=int, default=None, help="runs of each path")
    parser.add_argument("--only", choices=["distllm", "stock", "tcp"], action="append")
    parser.add_argument("--datagrams", default="1200,16384")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--serve", choices=["distllm", "stock", "tcp"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--datagram", type=int, default=1200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(args.serve, args.backend, args.datagram)
        return
    rounds = args.rounds or (300 if args.quick else 2000)
    bulk = (args.bulk_mb or (32 if args.quick else 64)) * MiB
    datagrams = [int(d) for d in args.datagrams.split(",")]
    backends = args.backends.split(",")
    kinds = args.only or ["distllm", "stock", "tcp"]
    plan: list[tuple[str, str, int]] = []
    if "distllm" in kinds:
        plan += [("distllm", b, d) for b in backends for d in datagrams]
    if "stock" in kinds:
        plan += [("stock", "asyncio", d) for d in datagrams]
    if "tcp" in kinds:
        plan += [("tcp", b, 0) for b in backends]
    repeat = args.repeat or (1 if args.quick else 3)
    runs: dict[tuple[str, str, int], list[Result]] = {step: [] for step in plan}
    for i in range(repeat):
        for step in plan:
            kind, backend, datagram = step
            print(f"run {i + 1}/{repeat}: {kind} {backend} {datagram or ''}", file=sys.stderr)
            runs[step].append(run_one(kind, backend, datagram, rounds, bulk))
    print_table([merge(results) for results in runs.values()])


if __name__ == "__main__":
    main()
