from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distllm.model import load_span
from distllm.server.throughput import measure_throughput
from distllm.testing.models import make_tiny_model


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = make_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_span(path, 0, 2, dtype=torch.float32)


def test_measures_then_reuses_the_cache(span, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "throughput.json"
    first = measure_throughput(span, cache_file=cache, steps=4)
    assert first.inference_rps > 0
    assert first.forward_rps > 0
    assert first.throughput == first.inference_rps
    (entry,) = json.loads(cache.read_text()).values()
    assert entry == {"inference_rps": first.inference_rps, "forward_rps": first.forward_rps}
    # A cached result is returned as is (no re-measurement noise).
    again = measure_throughput(span, cache_file=cache, steps=4)
    assert (again.inference_rps, again.forward_rps) == (first.inference_rps, first.forward_rps)


def test_network_caps_the_announced_throughput(span, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "t.json"
    tiny_link = measure_throughput(span, cache_file=cache, network_mbps=0.001, steps=4)
    # 0.001 Mbit/s moves 125 bytes/s: far fewer hidden states than the CPU computes.
    assert tiny_link.throughput == pytest.approx(125 / (span.hidden_size * 2))
    assert tiny_link.throughput < tiny_link.inference_rps


def test_unwritable_cache_is_not_fatal(span, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = measure_throughput(span, cache_file=blocker / "sub" / "t.json", steps=2)
    assert result.inference_rps > 0


def test_rejects_too_few_steps(span) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="steps must be >= 2"):
        measure_throughput(span, steps=1)
