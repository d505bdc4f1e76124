"""``distllm dht`` as a real process: address file, a client storing through it, clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from distllm.cli.main import build_parser
from distllm.config import DHTConfig, TransportConfig
from distllm.dht.node import DHTNode
from distllm.dht.records import sign_entry
from distllm.ids import PeerAddress
from distllm.rpc import RpcEndpoint
from distllm.testing import identity_for

quic = pytest.importorskip("distllm.transport.quic")

STARTUP = 30.0  # seconds; a cold interpreter importing aioquic on a busy 2-core machine
SHUTDOWN = 10.0


def start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    address_file = tmp_path / "address"
    command = [sys.executable, "-m", "distllm.cli.main", "dht", "--host", "127.0.0.1"]
    command += ["--port", "0", "--address-file", str(address_file), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return process, address_file


def wait_for_file(process: subprocess.Popen[bytes], path: Path) -> str:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"distllm dht exited with {process.returncode}: {err.decode()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("distllm dht wrote no address file")


def stop(process: subprocess.Popen[bytes], signum: int) -> tuple[str, str]:
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=SHUTDOWN)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"distllm dht did not exit within {SHUTDOWN} s of signal {signum}")
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def client_round_trip(bootstrap: PeerAddress) -> None:
    identity = identity_for(1)
    config = DHTConfig(call_timeout=5.0)
    transport_config = TransportConfig(max_datagram_size=1200)
    with anyio.fail_after(30):
        async with (
            quic.QuicEndpoint(identity, "127.0.0.1", 0, transport_config) as transport,
            RpcEndpoint(transport) as rpc,
            DHTNode(rpc, identity, initial_peers=[bootstrap], config=config, client_mode=True) as c,
        ):
            assert bootstrap.peer_id in c.routing_table
            entry = sign_entry(identity, "model/0", b"via the bootstrap node", time.time() + 60)
            assert await c.store(entry) == 1  # the bootstrap node is the whole swarm
            assert await c.get("model/0") == {entry.subkey: entry}


def test_dht_command_serves_until_sigterm(tmp_path: Path) -> None:
    process, address_file = start(tmp_path, "--identity", str(tmp_path / "key.pem"))
    try:
        text = wait_for_file(process, address_file)
        address = PeerAddress.parse(text)
        assert address.host == "127.0.0.1" and address.port > 0
        anyio.run(client_round_trip, address)
    finally:
        out, _ = stop(process, signal.SIGTERM)
    assert text in out.splitlines()
    assert (tmp_path / "key.pem").exists()


def test_dht_command_stops_on_ctrl_c_on_trio(tmp_path: Path) -> None:
    process, address_file = start(tmp_path, "--backend", "trio")
    try:
        PeerAddress.parse(wait_for_file(process, address_file))
    finally:
        _, err = stop(process, signal.SIGINT)
    assert "SIGINT received" in err


def test_dht_command_rejects_bad_peers(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["dht", "--initial-peers", "not-an-address"])
    assert args.run(args) == 2
    assert "distllm://" in capsys.readouterr().err
