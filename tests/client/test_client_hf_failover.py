"""A server leaves in the middle of ``generate``: the session fails over to a standby, replays
what the lost server held -- left padding and beam reorders included -- and the tokens still
equal transformers' exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import distributed, stop_server
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from distllm.testing.models import make_tiny_model

IDS = torch.tensor([[3, 3, 3, 1, 40, 52, 77], [1, 90, 41, 42, 43, 44, 45]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


class AtStep(LogitsProcessor):
    """Runs ``action`` once, when generate chooses its ``step``-th token (in its own thread)."""

    def __init__(self, step: int, action: Callable[[], None]) -> None:
        self.step, self.action, self.calls = step, action, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            self.action()
        return scores


@pytest.fixture(scope="module", params=["llama", "bloom"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("beams", [1, 2])
def test_a_lost_server_changes_no_token(family: tuple[Path, Any], backend: str, beams: int) -> None:
    path, reference = family
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "num_beams": beams, "do_sample": False}
    expected = reference.generate(IDS, attention_mask=MASK, **kwargs)
    spans = [(0, 2), (2, 4), (2, 4)]  # the last one is a standby for the second
    with (
        distributed(path, spans=spans, backend=backend) as (model, swarm),
        model.inference_session(max_length=20, batch_size=2 * beams) as session,
    ):
        victim = session.route[-1].peer
        processors = LogitsProcessorList([AtStep(4, lambda: stop_server(model, swarm, victim))])
        out = model.generate(IDS, attention_mask=MASK, logits_processor=processors, **kwargs)
        assert victim not in {hop.peer for hop in session.route}
        assert session._session.stats.failovers >= 1
    torch.testing.assert_close(out, expected)
