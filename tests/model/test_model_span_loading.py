"""Loading: only the span's tensors are read, sharded checkpoints work, unknown families fail."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distllm.model.checkpoint as checkpoint_module
from distllm.model import UnsupportedArchitecture, load_client_parts, load_span
from distllm.testing.models import make_tiny_model, tiny_config


class _RecordingOpen:
    """Wraps safetensors' ``safe_open`` and records every tensor materialised."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.read: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = self

        class Handle:
            def __init__(self) -> None:
                self.inner = recorder.real(*args, **kwargs)

            def __enter__(self) -> Handle:
                self.inner.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self.inner.__exit__(*exc)

            def keys(self) -> Any:
                return self.inner.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read.append(name)
                return self.inner.get_tensor(name)

        return Handle()


@pytest.mark.parametrize("family", ["llama", "bloom", "mixtral"])
def test_loading_a_span_reads_only_its_tensors(
    family: str, tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _RecordingOpen(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    load_span(tiny_model(family), 1, 3)
    blocks = {int(m.group(1)) for n in recorder.read if (m := re.search(r"\.(\d+)\.", n))}
    assert recorder.read and blocks == {1, 2}
    assert all(re.match(r"(model\.layers|transformer\.h)\.[12]\.", n) for n in recorder.read)
    assert len(recorder.read) == len(set(recorder.read))

    recorder.read.clear()
    load_client_parts(tiny_model(family))
    assert recorder.read and not any(re.search(r"\.\d+\.", n) for n in recorder.read)


def test_sharded_checkpoint(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    sharded = make_tiny_model("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    single = tiny_model("qwen2")  # same family, same seed: same weights in one file
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_span(sharded, 2, 4)(x), load_span(single, 2, 4)(x))
        parts, single_parts = load_client_parts(sharded), load_client_parts(single)
        torch.testing.assert_close(parts.logits(x), single_parts.logits(x))


def test_unsupported_architectures_are_named(tmp_path: Path) -> None:
    config = tiny_config("llama")
    config.model_type = "gpt2"
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4})
    )
    with pytest.raises(UnsupportedArchitecture, match=r"gpt2.*supported: bloom, falcon, llama"):
        load_span(tmp_path / "gpt2", 0, 1)
    rw = make_tiny_model("falcon", tmp_path / "falcon-rw", alibi=True, num_hidden_layers=1)
    with pytest.raises(UnsupportedArchitecture, match="alibi"):
        load_span(rw, 0, 1)
    assert issubclass(UnsupportedArchitecture, ValueError)


def test_span_bounds_are_checked(tiny_model: Callable[..., Path]) -> None:
    for start, end in [(0, 0), (2, 1), (0, 5), (-1, 2)]:
        with pytest.raises(ValueError, match="span"):
            load_span(tiny_model("llama"), start, end)
