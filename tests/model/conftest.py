"""Tiny checkpoints and their transformers twins, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distllm.testing.models import make_tiny_model


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(family, **overrides)`` -> checkpoint dir (cached per arguments)."""
    made: dict[tuple[Any, ...], Path] = {}

    def get(family: str, **overrides: Any) -> Path:
        key = (family, *sorted(overrides.items()))
        if key not in made:
            made[key] = make_tiny_model(family, tmp_path_factory.mktemp(family), **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], Any]:
    """``hf_model(path)`` -> the transformers model of a checkpoint, fp32, eval (cached)."""
    from transformers import AutoModelForCausalLM

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return loaded[path]

    return get
