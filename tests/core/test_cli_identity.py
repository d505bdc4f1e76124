from __future__ import annotations

import stat
from pathlib import Path

import pytest

from distllm.cli.main import main
from distllm.identity import Identity


def test_identity_command_creates_then_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "peer.pem"
    assert main(["identity", str(path)]) == 0
    created = capsys.readouterr().out
    assert "created" in created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    peer_id = str(Identity.load(path).peer_id)
    assert created.startswith(peer_id)
    assert main(["identity", str(path)]) == 0
    again = capsys.readouterr().out
    assert again.startswith(peer_id)
    assert "loaded" in again


def test_unknown_command_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
