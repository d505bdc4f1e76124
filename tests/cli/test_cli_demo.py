"""``distllm demo`` end to end, as a user runs it: a DHT node and servers as processes, an answer
streamed through them, and nothing left running afterwards -- Ctrl-C included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distllm.cli.loopback import even_spans
from distllm.testing.models import make_tiny_model

pytest.importorskip("distllm.transport.quic")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


def _demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The demo in a session of its own: its process group holds it and every child."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    command = [sys.executable, "-m", "distllm.cli.main", "demo", *args]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, start_new_session=True, env=dict(os.environ)
        )
    return process, out, err


def _left_in_group(pgid: int) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _finish(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the demo did not finish within {timeout} s")


def test_even_spans() -> None:
    assert even_spans(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_spans(4, 3) == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(ValueError, match="cannot split"):
        even_spans(2, 3)


@pytest.mark.timeout(240)
def test_the_demo_answers_and_stops_everything(checkpoint: Path, tmp_path: Path) -> None:
    process, out, err = _demo(
        tmp_path, "--model", str(checkpoint), "--servers", "2", "--max-new-tokens", "6"
    )
    assert _finish(process, 200) == 0, err.read_text()
    stdout, stderr = out.read_text(), err.read_text()
    assert "> What is the capital of France?" in stdout
    assert "route:" in stderr and "blocks   0..1" in stderr and "blocks   2..3" in stderr
    assert "tokens/s" in stderr and "the swarm is stopped" in stderr
    assert _left_in_group(process.pid) == []


@pytest.mark.timeout(240)
def test_ctrl_c_stops_the_whole_swarm(checkpoint: Path, tmp_path: Path) -> None:
    process, _, err = _demo(tmp_path, "--model", str(checkpoint), "--servers", "2")
    deadline = time.monotonic() + 120
    while "dht " not in err.read_text():  # the bootstrap node is up; servers are starting
        assert process.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "the demo never started its DHT node"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert _finish(process, 60) == 130, err.read_text()
    assert "interrupted" in err.read_text()
    assert _left_in_group(process.pid) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_with_smollm2(tmp_path: Path) -> None:
    process, out, err = _demo(tmp_path, "--max-new-tokens", "24")
    assert _finish(process, 850) == 0, err.read_text()
    assert "Paris" in out.read_text()
    assert "blocks  20..29" in err.read_text()
    assert _left_in_group(process.pid) == []
