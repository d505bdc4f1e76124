"""A swarm of real processes on this machine: one ``distllm dht`` bootstrap node and
``distllm serve`` servers, talking QUIC over loopback (``distllm demo`` and the benchmarks).

    with LoopbackSwarm(log_dir) as swarm:
        swarm.add_server(model_path, (0, 10), name="SmolLM2-135M-Instruct")
        swarm.wait_ready()
        ...  # a client joins through swarm.initial_peers

Each process writes its address to a file once it serves (the DHT node once listening, a server
once ONLINE) and its log to ``log_dir``.

Co-located servers share a few cores, and each one's OpenMP workers spin-wait after computing
(libgomp: ``GOMP_SPINCOUNT``, 300000 by default) -- on the very cores the next server of the
route then computes on. :data:`COLOCATED_ENV` shortens that spin; on separate machines it does
not matter. Leaving the block stops every process: SIGTERM (they
withdraw from the swarm and exit), then SIGKILL for those still alive after ``stop_timeout``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final

__all__ = ["COLOCATED_ENV", "LoopbackSwarm", "StartupError", "SwarmProcess", "even_spans"]


#: Environment for servers sharing a machine's cores (see the module doc): short OpenMP spins.
COLOCATED_ENV: Final[Mapping[str, str]] = {"GOMP_SPINCOUNT": "50000"}


class StartupError(RuntimeError):
    """A process of the swarm exited or stayed silent instead of coming up."""


def even_spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``parts`` contiguous spans covering ``num_blocks`` blocks evenly."""
    if not 1 <= parts <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


@dataclass
class SwarmProcess:
    """One process of the swarm."""

    name: str
    process: subprocess.Popen[bytes]
    address_file: Path
    log_file: Path
    _log: IO[bytes] = field(repr=False)
    address: str | None = None  # distllm://... once up

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_file.read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])


class LoopbackSwarm:
    """Processes of a local swarm; a context manager that stops them all on exit."""

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        log_level: str = "WARNING",
        stop_timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        #: Environment of the processes: this one's, updated with ``env``.
        self.env = {**os.environ, **(env or {})}
        self.host = host
        self.python = python
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.dht: SwarmProcess | None = None
        self.servers: list[SwarmProcess] = []

    def __enter__(self) -> LoopbackSwarm:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def initial_peers(self) -> list[str]:
        if self.dht is None or self.dht.address is None:
            raise RuntimeError("the bootstrap node is not up yet: call start_dht() first")
        return [self.dht.address]

    def start_dht(self, timeout: float = 60.0) -> str:
        """Start the bootstrap node; returns its address once it listens."""
        self.dht = self._spawn("dht", ["dht", "--host", self.host, "--port", "0"])
        self._wait([self.dht], timeout)
        return self.initial_peers[0]

    def add_server(
        self,
        model: str | Path,
        blocks: tuple[int, int],
        *,
        name: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> SwarmProcess:
        """Start a server of ``blocks`` (returns at once; :meth:`wait_ready` waits)."""
        args = ["serve", str(model), "--initial-peers", *self.initial_peers]
        args += ["--blocks", f"{blocks[0]}:{blocks[1]}", "--host", self.host, "--port", "0"]
        if name is not None:
            args += ["--model-name", name]
        label = f"server{len(self.servers)}-{blocks[0]}-{blocks[1]}"
        server = self._spawn(label, [*args, *extra])
        self.servers.append(server)
        return server

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until every server is ONLINE, or raise :class:`StartupError`."""
        self._wait(self.servers, timeout)

    def kill(self, server: SwarmProcess) -> None:
        """SIGKILL: the server vanishes without a word (a crash, a pulled cable)."""
        server.process.kill()
        server.process.wait()

    def close(self) -> None:
        """Stop every process: SIGTERM, then SIGKILL after ``stop_timeout``. Idempotent."""
        everyone = [*self.servers, *([self.dht] if self.dht else [])]
        for proc in everyone:
            if proc.process.poll() is None:
                proc.process.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for proc in everyone:
            try:
                proc.process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
            proc._log.close()

    def _spawn(self, name: str, args: list[str]) -> SwarmProcess:
        address_file = self.log_dir / f"{name}.address"
        address_file.unlink(missing_ok=True)
        log_file = self.log_dir / f"{name}.log"
        log = log_file.open("wb")
        command = [self.python, "-m", "distllm.cli.main", "--log-level", self.log_level]
        command += [*args, "--address-file", str(address_file)]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
        )
        return SwarmProcess(name, process, address_file, log_file, log)

    def _wait(self, procs: list[SwarmProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            while proc.address is None:
                if proc.address_file.is_file():
                    proc.address = proc.address_file.read_text().strip() or None
                    continue
                if proc.process.poll() is not None:
                    raise StartupError(
                        f"{proc.name} exited with code {proc.process.returncode}:\n"
                        f"{proc.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise StartupError(f"{proc.name} is not up after {timeout:g} s")
                time.sleep(0.05)
