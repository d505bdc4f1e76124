"""``model(input_ids)``: a full forward through the swarm, with logits equal to transformers'
(1e-4), padded rows and labels included; and what attention masks mean to the swarm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import distributed, open_sessions
from transformers import AutoModelForCausalLM

from distllm.client.hf_masks import left_padding, real_spans
from distllm.testing.models import make_tiny_model

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module", params=["llama", "bloom"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(params=["asyncio", "trio"])
def pair(request: pytest.FixtureRequest, family: tuple[Path, Any]) -> Iterator[Any]:
    path, reference = family
    with distributed(path, spans=[(0, 1), (1, 3), (3, 4)], backend=request.param) as (model, s):
        yield model, reference, s


def test_logits_equal_transformers(pair: Any) -> None:
    model, reference, swarm = pair
    ids = torch.randint(4, 128, (2, 9))
    with torch.no_grad():
        out = model(ids)
        expected = reference(ids)
    assert out.logits.shape == (2, 9, 128)
    torch.testing.assert_close(out.logits, expected.logits, **TOL)
    assert open_sessions(swarm) == 0  # a forward opens no session
    with torch.no_grad():
        embeds = reference.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected.logits, **TOL)


def test_padded_rows_and_labels(pair: Any) -> None:
    model, reference, _ = pair
    ids = torch.randint(4, 128, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], **TOL)
    labels = ids.clone()
    with torch.no_grad():
        ours = model(ids, labels=labels).loss
        theirs = reference(ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, **TOL)
    with pytest.raises(ValueError, match="padding only at the start or end"):
        model(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]] * 3))


def test_left_padding_of_masks() -> None:
    assert left_padding(None) is None
    assert left_padding(torch.ones(2, 3)) is None
    assert left_padding(torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]])) == (2, 1, 0)
    for bad in ([[1, 1, 0]], [[0, 1, 0, 1]], [[0, 0, 0]]):
        with pytest.raises(ValueError, match="left padding"):
            left_padding(torch.tensor(bad))
    with pytest.raises(ValueError, match="2D"):
        left_padding(torch.ones(3))


def test_real_spans_of_masks() -> None:
    assert real_spans(None, 2, 4) == [(0, 4), (0, 4)]
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    assert real_spans(mask, 3, 4) == [(1, 4), (0, 4), (1, 4)]
    with pytest.raises(ValueError, match="start or end"):
        real_spans(torch.tensor([[1, 0, 1, 1]]), 1, 4)
    with pytest.raises(ValueError, match="input_ids"):
        real_spans(torch.ones(2, 3), 2, 4)
