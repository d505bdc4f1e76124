from __future__ import annotations

from pathlib import Path

import pytest

from distllm.model.resolve import DEFAULT_MODEL, resolve_model
from distllm.testing.models import make_tiny_model


def test_directory_name_is_the_swarm_name(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path / "tiny-llama")
    resolved = resolve_model(path)
    assert resolved.name == "tiny-llama"
    assert resolved.path == path
    assert resolve_model(str(path), name="custom").name == "custom"


def test_unknown_model_names_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory") as info:
        resolve_model(tmp_path / "nope")
    assert DEFAULT_MODEL in str(info.value)
