"""The tiny-model builders other tests rely on: deterministic weights, a working tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from distllm.testing.models import make_tiny_model, tiny_config


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = load_file(
        make_tiny_model("llama", tmp_path / "a", num_hidden_layers=1) / "model.safetensors"
    )
    b = load_file(
        make_tiny_model("llama", tmp_path / "b", num_hidden_layers=1) / "model.safetensors"
    )
    c = load_file(
        make_tiny_model("llama", tmp_path / "c", seed=1, num_hidden_layers=1) / "model.safetensors"
    )
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    path = make_tiny_model("bloom", tmp_path / "m", num_hidden_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Hi there!").input_ids
    assert max(ids) < 128
    assert tokenizer.decode(ids) == "Hi there!"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_config("gpt2")
