"""``with model.inference_session(max_length=N):`` -- several ``generate`` calls continue one
remote session (Petals-style: each call's inputs are new tokens), and equal a fresh local
``generate`` over the whole history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import distributed, eventually_sync, open_sessions
from transformers import AutoModelForCausalLM

from distllm.client.hf import DistributedModelForCausalLM
from distllm.testing.models import make_tiny_model
from distllm.testing.swarm import LocalSwarm

PROMPT = torch.tensor([[1, 40, 52, 77, 60, 33, 70]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(params=["asyncio", "trio"])
def model(
    request: pytest.FixtureRequest, checkpoint: Path
) -> Iterator[tuple[DistributedModelForCausalLM, LocalSwarm]]:
    with distributed(checkpoint, backend=request.param) as pair:
        yield pair


def test_generate_calls_continue_one_session(model: Any, reference: Any) -> None:
    model, swarm = model
    extra = torch.tensor([[44, 45]])
    with model.inference_session(max_length=40) as session:
        a = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        assert session.position == a.shape[1] - 1  # the last token is sent by the next call
        b = model.generate(max_new_tokens=4, do_sample=False)  # no inputs: carry on
        torch.manual_seed(5)
        c = model.generate(extra, max_new_tokens=3, do_sample=True, top_k=20)
        assert open_sessions(swarm) == 2  # one session per server, all along
    eventually_sync(lambda: open_sessions(swarm) == 0)
    torch.testing.assert_close(a, reference.generate(PROMPT, max_new_tokens=4, do_sample=False))
    torch.testing.assert_close(b, reference.generate(a, max_new_tokens=4, do_sample=False))
    torch.manual_seed(5)
    history = torch.cat([b, extra], dim=1)
    expected = reference.generate(history, max_new_tokens=3, do_sample=True, top_k=20)
    torch.testing.assert_close(c, expected)


def test_a_padded_batch_continues(model: Any, reference: Any) -> None:
    model, _ = model
    ids = torch.tensor([[3, 3, 1, 40, 52], [1, 90, 41, 42, 43]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with model.inference_session(max_length=30, batch_size=2) as session:
        a = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        b = model.generate(torch.tensor([[50], [51]]), max_new_tokens=3, do_sample=False)
        assert session.padding == (2, 0)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(a, expected)
    history = torch.cat([a, torch.tensor([[50], [51]])], dim=1)
    history_mask = torch.ones_like(history)
    history_mask[0, :2] = 0
    expected = reference.generate(
        history, attention_mask=history_mask, max_new_tokens=3, do_sample=False
    )
    torch.testing.assert_close(b, expected)


def test_beam_search_ends_the_continuation(model: Any, reference: Any) -> None:
    model, _ = model
    with model.inference_session(max_length=30, batch_size=3):
        out = model.generate(PROMPT, num_beams=3, max_new_tokens=5, do_sample=False)
        expected = reference.generate(PROMPT, num_beams=3, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(out, expected)
        with pytest.raises(ValueError, match="beam search"):
            model.generate(max_new_tokens=2)


def test_limits_are_checked_before_anything_is_sent(model: Any) -> None:
    model, swarm = model
    with model.inference_session(max_length=10) as session:
        with pytest.raises(ValueError, match="max_length 10"):
            model.generate(PROMPT, max_new_tokens=8)
        with pytest.raises(ValueError, match="batch_size 1"):
            model.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)
        with pytest.raises(RuntimeError, match="already"), model.inference_session(max_length=4):
            pass
        assert session.position == 0
        model.generate(PROMPT, max_new_tokens=2)  # the session is still usable
    eventually_sync(lambda: open_sessions(swarm) == 0)


def test_outside_a_session_each_generate_has_its_own(model: Any, reference: Any) -> None:
    model, swarm = model
    for _ in range(2):
        out = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(out, reference.generate(PROMPT, max_new_tokens=3))
        eventually_sync(lambda: open_sessions(swarm) == 0)
    assert model.active_session is None
