"""Real processes on loopback QUIC: ``distllm dht`` + ``distllm serve`` x3, a client here.

A server is killed with SIGKILL in the middle of a generation: its standby takes over and the
tokens are those of local ``transformers``. With no standby left, the next step fails with a
clear error within the configured time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
from client_harness import hf_greedy

from distllm.client import Client, ClientConfig, NoRouteError, RouteFailedError
from distllm.client.generation import SamplingParams, generate_ids
from distllm.config import DHTConfig, TransportConfig
from distllm.ids import PeerAddress
from distllm.testing.models import make_tiny_model

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STARTUP = 90.0  # seconds: cold interpreters importing torch on a busy 2-core machine
PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])
CONFIG = ClientConfig(
    step_timeout=5.0,
    connect_timeout=3.0,
    failover_timeout=4.0,
    ban_base=0.5,
    refresh_period=1.0,
    dht=DHTConfig(call_timeout=1.0, lookup_timeout=5.0),
)
TRANSPORT = TransportConfig(keepalive_interval=0.2, dead_peer_timeout=1.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # processes are the point here; both backends run in the other tests


def spawn(*args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "distllm.cli.main", "--log-level", "WARNING", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def address(process: subprocess.Popen[bytes], path: Path) -> PeerAddress:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return PeerAddress.parse(path.read_text().strip())
        if process.poll() is not None:
            assert process.stderr is not None
            pytest.fail(f"exited with {process.returncode}: {process.stderr.read().decode()}")
        time.sleep(0.1)
    pytest.fail(f"no address in {path} after {STARTUP} s")


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[tuple[Path, PeerAddress, dict[object, subprocess.Popen]]]:
    """A DHT node and servers of blocks [0, 2), [2, 4), [2, 4) of a tiny Llama."""
    model = make_tiny_model("llama", tmp_path / "tiny-llama")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dht = spawn("dht", "--host", "127.0.0.1", "--port", "0",
                    "--address-file", str(tmp_path / "dht"))  # fmt: skip
        processes.append(dht)
        bootstrap = address(dht, tmp_path / "dht")
        servers = {}
        for k, blocks in enumerate(["0:2", "2:4", "2:4"]):
            file = tmp_path / f"server{k}"
            process = spawn(
                "serve", str(model), "--initial-peers", str(bootstrap), "--blocks", blocks,
                "--host", "127.0.0.1", "--port", "0", "--no-measure", "--num-threads", "1",
                "--announce-period", "2", "--address-file", str(file),
            )  # fmt: skip
            processes.append(process)
            servers[file] = process
        by_peer = {address(p, f).peer_id: p for f, p in servers.items()}
        yield model, bootstrap, by_peer
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


async def test_kill_9_mid_generation_then_no_replacement(swarm) -> None:
    model_path, bootstrap, servers = swarm
    expected = hf_greedy(model_path, PROMPT, 12)
    async with Client([bootstrap], config=CONFIG, transport_config=TRANSPORT) as client:
        model = await client.model(model_path)

        async def all_announced() -> bool:
            await model.refresh()
            return len(model.router.view.servers) == 3

        with anyio.fail_after(STARTUP):
            while not await all_announced():  # noqa: ASYNC110 (polling the DHT)
                await anyio.sleep(0.5)
        async with model.inference_session(max_length=32) as session:
            tokens: list[int] = []
            times: list[float] = []
            async for token in generate_ids(session, PROMPT, 12, SamplingParams()):
                tokens.append(int(token))
                times.append(anyio.current_time())
                if len(tokens) == 4:
                    victim = session.route[1].peer
                    os.kill(servers[victim].pid, signal.SIGKILL)
                    times[-1] = anyio.current_time()
            assert tokens == expected
            assert victim not in {hop.peer for hop in session.route}
            assert session.stats.failovers == 1
            print(
                f"kill -9 -> next token: {times[4] - times[3]:.3f} s, of which failover "
                f"(failure noticed -> step done): {session.stats.recovery_seconds[0]:.3f} s"
            )

            # The standby dies too: nobody holds blocks [2, 4) any more.
            standby = session.route[1].peer
            os.kill(servers[standby].pid, signal.SIGKILL)
            hidden = model.parts.embed(torch.tensor([[7]]))
            began = anyio.current_time()
            with pytest.raises((NoRouteError, RouteFailedError)) as caught:
                await session.step(hidden)
            elapsed = anyio.current_time() - began
        print(
            f"no replacement: {type(caught.value).__name__} after {elapsed:.2f} s: {caught.value}"
        )
        # Noticed within dead_peer_timeout or step_timeout; then failover_timeout at most.
        assert elapsed < CONFIG.step_timeout + CONFIG.failover_timeout + 1.0
        assert "[2, 4)" in str(caught.value) or "blocks 2, 3" in str(caught.value)
