"""Sampling equals transformers' procedure draw for draw; text streams never split characters."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from distllm.client.generation import Sampler, SamplingParams, TextStream
from distllm.testing.models import tiny_tokenizer


def hf_sample(logits: torch.Tensor, seed: int, temperature: float, top_k, top_p) -> torch.Tensor:
    """What transformers' sampling does with a global generator seeded with ``seed``."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    torch.manual_seed(seed)
    out = []
    for row in logits:
        scores = warpers(None, row[None].clone())
        out.append(torch.multinomial(scores.softmax(dim=-1), num_samples=1)[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("top_k", [None, 1, 5, 40])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_sampling_follows_transformers_draw_for_draw(temperature, top_k, top_p):
    logits = torch.randn(6, 128, generator=torch.Generator().manual_seed(7)) * 3
    sampler = Sampler(SamplingParams(True, temperature, top_k, top_p, seed=99))
    ours = torch.stack([sampler(row[None])[0] for row in logits])
    assert ours.tolist() == hf_sample(logits, 99, temperature, top_k, top_p).tolist()


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 5.0, 5.0]])
    assert Sampler(SamplingParams()).__call__(logits).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 0.0, "temperature must be a finite number > 0, got 0.0"),
        ("top_k", 0, "top_k must be None or an int >= 1, got 0"),
        ("top_p", 1.5, r"top_p must be None or in \(0, 1\], got 1.5"),
    ],
)
def test_sampling_params_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(do_sample=True, **{field: value})


def test_text_stream_pieces_add_up_and_wait_for_whole_characters():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("Hello, world!")["input_ids"]
    stream = TextStream(tokenizer, ids[:3])
    pieces = [stream.push(i) for i in ids[3:]] + [stream.flush()]
    assert "".join(pieces) == "lo, world!"
    assert all(pieces[:-1])  # one character per token: every push yields

    class Bytes:  # a byte-level decoder: a 2-byte character arrives in two tokens
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), list(b"a"))
    encoded = list("é!".encode())
    assert [stream.push(b) for b in encoded] == ["", "é", "!"]
