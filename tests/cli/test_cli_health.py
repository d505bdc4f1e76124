"""``distllm health``: the survey against an in-memory swarm, and the command end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from distllm.cli.health_cmd import Health, render, survey
from distllm.cli.main import main
from distllm.testing.models import make_tiny_model
from distllm.testing.swarm import local_swarm


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.mark.anyio
async def test_survey_reports_servers_and_holes(llama: Path) -> None:
    async with local_swarm(llama, [(0, 2), (0, 2)]) as swarm:
        health = await survey(swarm.bootstrap, "tiny-llama")
        assert health.num_blocks == 4
        assert health.view is not None
        assert len(health.view.servers) == 2
        assert health.uncovered == [2, 3]
        assert not health.healthy
        text = render(health)
        assert "UNSERVED blocks: 2, 3" in text
        assert "servers per block: 2 2 0 0" in text
        await swarm.add_server(2, 4)
        healed = await survey(swarm.bootstrap, "tiny-llama")
        assert healed.healthy
        assert "every block served" in render(healed)


@pytest.mark.anyio
async def test_unknown_model(llama: Path) -> None:
    async with local_swarm(llama, [(0, 4)]) as swarm:
        health = await survey(swarm.bootstrap, "no-such-model")
        assert health == Health("no-such-model", 0, None)
        assert not health.healthy
        assert render(health) == "no server publishes model 'no-such-model'"


def test_bad_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "m", "--initial-peers", "not-an-address"]) == 2
    assert "must start with" in capsys.readouterr().err
