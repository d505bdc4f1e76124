"""Every UDP datagram this process sends leaves ``DISTLLM_BENCH_UDP_DELAY_MS`` later.

A userspace stand-in for ``tc qdisc ... netem delay`` (this machine's kernel has no netem), for
``benchmarks/inference.py --delay-ms``: the benchmark puts this directory on ``PYTHONPATH``, so
Python imports it at start-up in every process of the run (servers, DHT node, client). A
datagram sent from a running asyncio event loop is handed to the kernel ``delay`` seconds
later by that loop (a timer), so each one-way trip takes at least ``delay``; sends from
elsewhere go at once. Never imported by distllm itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

_DELAY = float(os.environ.get("DISTLLM_BENCH_UDP_DELAY_MS", "0")) / 1000
_send_now = socket.socket.sendto


def _send_later(sock: socket.socket, data: bytes, args: tuple[object, ...]) -> None:
    with contextlib.suppress(OSError):  # as a lost datagram: QUIC recovers
        _send_now(sock, data, *args)  # type: ignore[arg-type]


def _delayed_sendto(self: socket.socket, data: bytes, *args: object) -> int:
    if self.type != socket.SOCK_DGRAM:
        return _send_now(self, data, *args)  # type: ignore[arg-type]
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _send_now(self, data, *args)  # type: ignore[arg-type]
    data = bytes(data)  # the caller may reuse its buffer
    loop.call_later(_DELAY, _send_later, self, data, args)
    return len(data)


if _DELAY > 0:
    socket.socket.sendto = _delayed_sendto  # type: ignore[method-assign, assignment]
