"""``distllm serve`` as a real process: joins a ``distllm dht`` node, announces its span,
serves span RPCs over QUIC, and on SIGTERM announces OFFLINE and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from distllm.config import DHTConfig
from distllm.dht.node import DHTNode
from distllm.dht.records import verify_entry
from distllm.dht.schema import ServerState, decode_server_entry
from distllm.identity import Identity
from distllm.ids import PeerAddress
from distllm.protocol.span_messages import METHOD_INFO, SpanInfo, SpanInfoRequest
from distllm.rpc import RpcEndpoint
from distllm.testing.models import make_tiny_model
from distllm.transport.quic import QuicEndpoint

STARTUP = 60.0  # seconds: a cold interpreter importing torch on a busy 2-core machine
SHUTDOWN = 15.0


def spawn(*args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "distllm.cli.main", "--log-level", "WARNING", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for(process: subprocess.Popen[bytes], path: Path) -> PeerAddress:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if path.exists():
            return PeerAddress.parse(path.read_text().strip())
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode}: {process.communicate()[1].decode()}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no address in {path} after {STARTUP} s")


def terminate(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=SHUTDOWN)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("did not exit after SIGTERM")
    assert process.returncode == 0, err.decode()


async def span_info(server: PeerAddress) -> SpanInfo:
    identity = Identity.generate()
    async with (
        QuicEndpoint(identity, "127.0.0.1", 0) as transport,
        RpcEndpoint(transport) as rpc,
    ):
        reply = await rpc.call(server, METHOD_INFO, SpanInfoRequest(), timeout=10)
        assert isinstance(reply, SpanInfo)
        return reply


async def states(bootstrap: PeerAddress, key: str) -> list[ServerState]:
    identity = Identity.generate()
    async with (
        QuicEndpoint(identity, "127.0.0.1", 0) as transport,
        RpcEndpoint(transport) as rpc,
        DHTNode(
            rpc, identity, initial_peers=[bootstrap], config=DHTConfig(), client_mode=True
        ) as node,
    ):
        entries = await node.get(key)
        for entry in entries.values():
            verify_entry(entry)
        return [decode_server_entry(e).state for e in entries.values()]


@pytest.mark.slow
def test_serve_announces_serves_and_withdraws(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path / "tiny-llama")
    dht = spawn("dht", "--host", "127.0.0.1", "--port", "0", "--address-file", str(tmp_path / "d"))
    server = None
    try:
        bootstrap = wait_for(dht, tmp_path / "d")
        server = spawn(
            "serve", str(model), "--host", "127.0.0.1", "--initial-peers", str(bootstrap),
            "--blocks", "1:3", "--cache-tokens", "1024", "--no-measure",
            "--address-file", str(tmp_path / "s"),
        )  # fmt: skip
        address = wait_for(server, tmp_path / "s")
        info = anyio.run(span_info, address)
        assert (info.model, info.start, info.end) == ("tiny-llama", 1, 3)
        assert info.free_cache_tokens == info.total_cache_tokens == 1024
        assert anyio.run(states, bootstrap, "tiny-llama/2") == [ServerState.ONLINE]
        health = spawn("health", "tiny-llama", "--initial-peers", str(bootstrap))
        out, _ = health.communicate(timeout=STARTUP)
        assert health.returncode == 1  # blocks 0 and 3 are served by nobody
        assert "UNSERVED blocks: 0, 3" in out.decode()
        assert "servers per block: 0 1 1 0" in out.decode()
        terminate(server)
        server = None
        assert anyio.run(states, bootstrap, "tiny-llama/2") == [ServerState.OFFLINE]
    finally:
        for process in (server, dht):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()


def test_serve_rejects_a_span_outside_the_model(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path / "tiny-llama")
    peer = Identity.generate().peer_id
    process = spawn(
        "serve", str(model), "--initial-peers", f"distllm://{peer}@127.0.0.1:9",
        "--blocks", "2:99", "--no-measure",
    )  # fmt: skip
    _, err = process.communicate(timeout=STARTUP)
    assert process.returncode == 1
    assert "not within the model's 4 blocks" in err.decode()


def test_serve_rejects_a_relay_timeout_that_is_not_positive(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path / "tiny-llama")
    peer = Identity.generate().peer_id
    process = spawn(
        "serve", str(model), "--initial-peers", f"distllm://{peer}@127.0.0.1:9",
        "--relay-timeout", "0", "--no-measure",
    )  # fmt: skip
    _, err = process.communicate(timeout=STARTUP)
    assert process.returncode == 2
    assert "relay_timeout" in err.decode()


def test_serve_rejects_an_unknown_model(tmp_path: Path) -> None:
    peer = Identity.generate().peer_id
    process = spawn(
        "serve", str(tmp_path / "nothing"), "--initial-peers", f"distllm://{peer}@127.0.0.1:9"
    )
    _, err = process.communicate(timeout=STARTUP)
    assert process.returncode == 2
    assert "neither a checkpoint directory" in err.decode()
