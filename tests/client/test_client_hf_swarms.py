"""The HF face as users meet it: ``distllm.AutoDistributedModelForCausalLM.from_pretrained``
joining a swarm of real processes over QUIC (the model owns its loop thread and stops it), and
SmolLM2 on a real chat prompt (slow)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_harness import distributed
from transformers import AutoModelForCausalLM, AutoTokenizer

import distllm
from distllm.cli.loopback import LoopbackSwarm
from distllm.testing.models import make_tiny_model

PROMPT = torch.tensor([[1, 40, 52, 77, 60, 33, 70]])


def _portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "distllm-portal"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("bloom", tmp_path_factory.mktemp("m") / "tiny-bloom")


@pytest.fixture(scope="module")
def swarm(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("distllm.transport.quic")
    with LoopbackSwarm(tmp_path_factory.mktemp("logs")) as procs:
        procs.start_dht()
        procs.add_server(checkpoint, (0, 4), extra=("--no-measure", "--num-threads", "1"))
        procs.wait_ready(120)
        yield procs.initial_peers[0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_from_pretrained_over_quic_owns_and_stops_its_loop(
    swarm: str, checkpoint: Path, backend: str
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = distllm.AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=[swarm], backend=backend
    )
    with model:
        assert isinstance(model, distllm.DistributedModelForCausalLM)
        assert len(_portal_threads()) == 1
        expected = reference.generate(PROMPT, max_new_tokens=6, num_beams=2, do_sample=False)
        out = model.generate(PROMPT, max_new_tokens=6, num_beams=2, do_sample=False)
        torch.testing.assert_close(out, expected)
    assert _portal_threads() == []  # close() stopped the loop and joined its thread
    with pytest.raises(RuntimeError, match="closed"):
        model.generate(PROMPT, max_new_tokens=1)
    model.close()  # idempotent


def test_from_pretrained_checks_its_arguments(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="initial_peers"):
        distllm.AutoDistributedModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="portal"):
        distllm.AutoDistributedModelForCausalLM.from_pretrained(checkpoint, client=object())
    with pytest.raises(FileNotFoundError):
        distllm.AutoDistributedModelForCausalLM.from_pretrained("/nowhere", initial_peers=["x"])
    assert _portal_threads() == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_answers_a_chat_prompt_like_transformers() -> None:
    from distllm.model.resolve import DEFAULT_MODEL, resolve_model

    path = resolve_model(DEFAULT_MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with distributed(path, spans=[(0, 10), (10, 20), (20, 30)]) as (model, _):
        greedy = model.generate(ids, max_new_tokens=20, do_sample=False)
        torch.testing.assert_close(greedy, reference.generate(ids, max_new_tokens=20))
        assert "Paris" in tokenizer.decode(greedy[0, ids.shape[1] :])
        outputs = []
        for m in (model, reference):
            torch.manual_seed(1)
            outputs.append(m.generate(ids, max_new_tokens=16, do_sample=True, top_p=0.9))
        torch.testing.assert_close(outputs[0], outputs[1])
