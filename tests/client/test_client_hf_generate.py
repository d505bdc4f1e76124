"""``model.generate`` through a swarm equals ``transformers``' local ``generate`` exactly (fp32):
greedy, sampling with a seed, beam search, repetition penalty, left-padded batches, length
limits -- for tiny random Llama and BLOOM, the portal's loop on asyncio and on trio."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import distributed, eventually_sync, open_sessions
from transformers import AutoModelForCausalLM

from distllm.client.hf import DistributedModelForCausalLM
from distllm.testing.models import make_tiny_model
from distllm.testing.swarm import LocalSwarm

FAMILIES = ["llama", "bloom"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


@pytest.fixture(scope="module")
def references(checkpoints: Callable[[str], Path]) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in loaded:
            loaded[family] = AutoModelForCausalLM.from_pretrained(checkpoints(family)).eval()
        return loaded[family]

    return get


@pytest.fixture(params=[(f, b) for f in FAMILIES for b in ("asyncio", "trio")], ids=str)
def pair(
    request: pytest.FixtureRequest,
    checkpoints: Callable[[str], Path],
    references: Callable[[str], Any],
) -> Iterator[tuple[DistributedModelForCausalLM, Any, LocalSwarm]]:
    """``(distributed model, local reference, swarm)`` of one family, on one backend."""
    family, backend = request.param
    with distributed(checkpoints(family), backend=backend) as (model, swarm):
        yield model, references(family), swarm


PROMPT = torch.tensor([[1, 40, 52, 77, 60, 33, 70]])


def _same(model: Any, reference: Any, *args: Any, seed: int | None = None, **kwargs: Any) -> Any:
    """Both generate; the outputs must be identical. Returns the distributed output."""
    outputs = []
    for m in (model, reference):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(m.generate(*args, **kwargs))
    ours, theirs = outputs
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        return ours
    # return_dict_in_generate: the scores show what the tokens may hide (a wrong cache row)
    torch.testing.assert_close(ours.sequences, theirs.sequences, rtol=0, atol=0)
    for mine, reference in zip(ours.scores, theirs.scores, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)
    return ours.sequences


def test_greedy(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, swarm = pair
    out = _same(model, reference, PROMPT, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > PROMPT.shape[1]
    eventually_sync(lambda: open_sessions(swarm) == 0)  # generate's own session is closed


def test_sampling_with_a_seed(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, _ = pair
    for seed in (0, 7):
        _same(
            model,
            reference,
            PROMPT,
            seed=seed,
            do_sample=True,
            max_new_tokens=12,
            temperature=0.9,
            top_k=40,
            top_p=0.9,
            num_return_sequences=2,
        )


def test_beam_search(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, _ = pair
    scores = {"return_dict_in_generate": True, "output_scores": True}
    _same(model, reference, PROMPT, num_beams=3, max_new_tokens=10, do_sample=False, **scores)
    _same(
        model,
        reference,
        PROMPT,
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=8,
        length_penalty=0.5,
        do_sample=False,
    )


def test_repetition_penalty_and_length_limits(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, _ = pair
    _same(
        model,
        reference,
        PROMPT,
        repetition_penalty=1.5,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    out = _same(model, reference, PROMPT, max_length=PROMPT.shape[1] + 5, do_sample=False)
    assert out.shape[1] <= PROMPT.shape[1] + 5
    out = _same(model, reference, PROMPT, max_new_tokens=1, do_sample=False)
    assert out.shape[1] == PROMPT.shape[1] + 1


def _left_padded(rows: list[list[int]], pad: int = 3) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


BATCH = _left_padded([[1, 40, 52, 77, 60, 33, 70], [1, 90, 41], [1, 55, 66, 42, 81]])


def test_a_left_padded_batch(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, _ = pair
    _same(model, reference, **BATCH, max_new_tokens=10, do_sample=False)
    _same(model, reference, **BATCH, max_new_tokens=10, do_sample=True, seed=3, top_k=30)
    # beams of padded prompts: reorders stay among rows of equal padding
    scores = {"return_dict_in_generate": True, "output_scores": True}
    _same(model, reference, **BATCH, max_new_tokens=6, num_beams=3, do_sample=False, **scores)


def test_right_padding_is_refused(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, _, swarm = pair
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.ones(2, 4, dtype=torch.long), attention_mask=mask, max_new_tokens=2)
    # (servers end sessions a moment after the client's goodbye: those of earlier tests too)
    eventually_sync(lambda: open_sessions(swarm) == 0)


def test_generate_from_inputs_embeds(pair: tuple[Any, Any, LocalSwarm]) -> None:
    model, reference, _ = pair
    embeds = reference.get_input_embeddings()(PROMPT).detach()
    _same(model, reference, inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
