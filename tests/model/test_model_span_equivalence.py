"""Spans built from tiny random checkpoints reproduce transformers, for every family.

(a) a span's stateless forward equals the same blocks inside the full transformers model;
(b) prefill + decode + rollback + re-decode through the paged cache equals the stateless forward;
(c) one batched step over sessions of different lengths equals the sessions stepped alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distllm.model import PagedKVCache, StepInput, load_client_parts, load_span
from distllm.testing.models import TINY_FAMILIES, capture_block_io

FAMILIES = pytest.mark.parametrize("family", TINY_FAMILIES)


@FAMILIES
def test_forward_matches_transformers_blocks(
    family: str, tiny_model: Callable[..., Path], hf_model: Callable[[Path], Any]
) -> None:
    path = tiny_model(family)
    input_ids = torch.randint(0, 128, (2, 9))
    for start, end in [(0, 4), (1, 3)]:
        hidden_in, expected = capture_block_io(hf_model(path), start, end, input_ids)
        span = load_span(path, start, end)
        assert (span.start, span.end, span.num_blocks) == (start, end, end - start)
        torch.testing.assert_close(span(hidden_in), expected, atol=1e-5, rtol=1e-5)


@FAMILIES
def test_full_model_logits_through_client_parts(
    family: str, tiny_model: Callable[..., Path], hf_model: Callable[[Path], Any]
) -> None:
    path = tiny_model(family)
    input_ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = hf_model(path)(input_ids=input_ids).logits
        client = load_client_parts(path)
        logits = client.logits(load_span(path, 0, 4)(client.embed(input_ids)))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@FAMILIES
def test_paged_steps_with_rollback_match_stateless_forward(
    family: str, tiny_model: Callable[..., Path]
) -> None:
    span = load_span(tiny_model(family), 1, 4)
    x = torch.randn(12, span.hidden_size)
    cache = PagedKVCache(span, num_pages=8, page_size=4)
    cache.open("s")
    with torch.no_grad():
        full = span(x[None])[0]
        outs = [span.step(cache, [StepInput("s", x[:5], 0)])[0]]
        outs += [span.step(cache, [StepInput("s", x[i : i + 1], i)])[0] for i in (5, 6, 7)]
        torch.testing.assert_close(torch.cat(outs), full[:8], atol=1e-5, rtol=1e-5)
        assert cache.length("s") == 8

        # Roll back to position 6 and continue with other tokens (1, then 2, then 1 at a time).
        y = torch.cat([x[:6], torch.randn(4, span.hidden_size)])
        full_y = span(y[None])[0]
        outs = [span.step(cache, [StepInput("s", y[6:7], 6)])[0]]
        outs.append(span.step(cache, [StepInput("s", y[7:9], 7)])[0])
        outs.append(span.step(cache, [StepInput("s", y[9:10], 9)])[0])
    torch.testing.assert_close(torch.cat(outs), full_y[6:10], atol=1e-5, rtol=1e-5)
    assert cache.length("s") == 10


@FAMILIES
def test_batched_step_matches_sessions_stepped_alone(
    family: str, tiny_model: Callable[..., Path]
) -> None:
    span = load_span(tiny_model(family), 0, 2)
    prefixes = {"a": 3, "b": 7, "c": 10}
    new_tokens = {"a": 1, "b": 1, "c": 3, "d": 5}  # "d" is new: prefill beside decodes
    xs = {s: torch.randn(prefixes.get(s, 0) + n, span.hidden_size) for s, n in new_tokens.items()}
    batched = PagedKVCache(span, num_pages=16, page_size=4)
    alone = PagedKVCache(span, num_pages=16, page_size=4)
    with torch.no_grad():
        for cache in (batched, alone):
            for sid in new_tokens:
                cache.open(sid)
            for sid, length in prefixes.items():
                span.step(cache, [StepInput(sid, xs[sid][:length], 0)])
        inputs = [StepInput(s, xs[s][prefixes.get(s, 0) :], prefixes.get(s, 0)) for s in xs]
        together = span.step(batched, inputs)
        separately = [span.step(alone, [item])[0] for item in inputs]
        references = [span(xs[s][None])[0, prefixes.get(s, 0) :] for s in xs]
    for got, want, ref in zip(together, separately, references, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert {s: batched.length(s) for s in xs} == {s: len(x) for s, x in xs.items()}


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # falcon-40b style
        ("falcon", {"multi_query": False, "parallel_attn": False}),
    ],
    ids=["mistral-window", "qwen2-window", "falcon-new-arch", "falcon-mha"],
)
def test_variants_dense_and_paged(
    family: str,
    overrides: dict[str, Any],
    tiny_model: Callable[..., Path],
    hf_model: Callable[[Path], Any],
) -> None:
    path = tiny_model(family, **overrides)
    input_ids = torch.randint(0, 128, (1, 11))
    hidden_in, expected = capture_block_io(hf_model(path), 0, 4, input_ids)
    span = load_span(path, 0, 4)
    torch.testing.assert_close(span(hidden_in), expected, atol=1e-5, rtol=1e-5)
    cache = PagedKVCache(span, num_pages=8, page_size=4)
    cache.open(0)
    with torch.no_grad():
        outs = [span.step(cache, [StepInput(0, hidden_in[0, :6], 0)])[0]]
        outs += [
            span.step(cache, [StepInput(0, hidden_in[0, i : i + 1], i)])[0] for i in range(6, 11)
        ]
    torch.testing.assert_close(torch.cat(outs), expected[0], atol=1e-5, rtol=1e-5)
