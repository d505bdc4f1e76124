"""Span features beyond plain equivalence: gradients, deep prompts, bf16, COW forks, full cache."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distllm.model import CacheFull, PagedKVCache, StepInput, load_client_parts, load_span


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_forward_backward_matches_transformers(
    family: str, tiny_model: Callable[..., Path], hf_model: Callable[[Path], Any]
) -> None:
    path = tiny_model(family)
    span = load_span(path, 0, 4)
    client = load_client_parts(path)
    assert not any(p.requires_grad for p in span.parameters())
    x = torch.randn(2, 6, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    hidden = x if client.embed_norm is None else client.embed_norm(x)
    ours = client.final_norm(span(hidden))
    ours.square().sum().backward()
    # transformers' base model: (embedding norm,) blocks, final norm
    expected = hf_model(path).base_model(inputs_embeds=x_ref).last_hidden_state
    expected.square().sum().backward()

    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_deep_prompts_are_added_before_each_block(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    span = load_span(path, 0, 2)
    first, second = load_span(path, 0, 1), load_span(path, 1, 2)
    x = torch.randn(2, 7, 64)
    prompts = torch.randn(2, 1, 3, 64, requires_grad=True)  # batch 1 broadcasts

    def prompted(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.cat([h[:, :3] + p, h[:, 3:]], dim=1)

    out = span(x, prompts=prompts)
    expected = second(prompted(first(prompted(x, prompts[0])), prompts[1]))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompts"):
        span(x, prompts=torch.zeros(3, 1, 3, 64))


def test_bfloat16_span(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    span32, span16 = load_span(path, 0, 4), load_span(path, 0, 4, dtype=torch.bfloat16)
    assert span16.dtype == torch.bfloat16
    x = torch.randn(1, 6, 64)
    cache = PagedKVCache(span16, num_pages=4, page_size=4)
    cache.open(0)
    with torch.no_grad():
        dense = span16(x)
        assert dense.dtype == torch.bfloat16
        torch.testing.assert_close(dense.float(), span32(x), atol=0.1, rtol=0.05)
        step = torch.cat(
            [span16.step(cache, [StepInput(0, x[0, :4], 0)])[0]]
            + [span16.step(cache, [StepInput(0, x[0, i : i + 1], i)])[0] for i in (4, 5)]
        )
    torch.testing.assert_close(step.float(), dense[0].float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_fork_shares_the_prefix_copy_on_write(family: str, tiny_model: Callable[..., Path]) -> None:
    span = load_span(tiny_model(family), 0, 2)
    prefix, a_next, b_next = torch.randn(6, 64), torch.randn(2, 64), torch.randn(2, 64)
    cache = PagedKVCache(span, num_pages=6, page_size=4)
    cache.open("a")
    with torch.no_grad():
        span.step(cache, [StepInput("a", prefix, 0)])
        free = cache.free_tokens
        cache.fork("a", "b", 6)
        assert cache.free_tokens == free  # the fork shares pages
        a_out, b_out = span.step(cache, [StepInput("a", a_next, 6), StepInput("b", b_next, 6)])
        assert cache.free_tokens == free - 4  # one copy of the shared partial page suffices
        torch.testing.assert_close(a_out, span(torch.cat([prefix, a_next])[None])[0, 6:])
        torch.testing.assert_close(b_out, span(torch.cat([prefix, b_next])[None])[0, 6:])
        # "a" rolls back into the still-shared first page: it must copy, "b" must not see it.
        cache.fork("b", "c", 8)
        span.step(cache, [StepInput("a", torch.randn(1, 64), 2)])
        b_again = span.step(cache, [StepInput("c", b_next[1:], 7)])[0]
        torch.testing.assert_close(b_again, b_out[1:], atol=1e-5, rtol=1e-5)


def test_full_cache_raises_and_changes_nothing(tiny_model: Callable[..., Path]) -> None:
    span = load_span(tiny_model("llama"), 0, 1)
    cache = PagedKVCache(span, num_pages=3, page_size=4)
    cache.open("a")
    cache.open("b")
    with torch.no_grad():
        span.step(cache, [StepInput("a", torch.randn(8, 64), 0)])
        with pytest.raises(CacheFull) as caught:
            span.step(
                cache,
                [StepInput("a", torch.randn(1, 64), 8), StepInput("b", torch.randn(5, 64), 0)],
            )
        assert caught.value.free_tokens == 4
        assert (cache.length("a"), cache.length("b"), cache.free_tokens) == (8, 0, 4)
        cache.close("a")
        span.step(cache, [StepInput("b", torch.randn(5, 64), 0)])
    assert cache.free_tokens == 4


def test_step_rejects_bad_input_without_side_effects(tiny_model: Callable[..., Path]) -> None:
    span = load_span(tiny_model("qwen2"), 0, 1)
    cache = PagedKVCache(span, num_pages=4, page_size=4)
    cache.open("a")
    with torch.no_grad():
        span.step(cache, [StepInput("a", torch.randn(3, 64), 0)])
        with pytest.raises(ValueError, match="cannot write"):
            span.step(cache, [StepInput("a", torch.randn(1, 64), 4)])  # a gap at position 3
        with pytest.raises(ValueError, match="expected hidden"):
            span.step(cache, [StepInput("a", torch.randn(1, 32), 3)])
        with pytest.raises(ValueError, match="at least one token"):
            span.step(cache, [StepInput("a", torch.randn(0, 64), 3)])
        with pytest.raises(KeyError):
            span.step(cache, [StepInput("zz", torch.randn(1, 64), 0)])
        with pytest.raises(ValueError, match="not built for this span"):
            load_span(tiny_model("qwen2"), 0, 2).step(
                cache, [StepInput("a", torch.randn(1, 64), 3)]
            )
        assert span.step(cache, []) == []
    assert cache.length("a") == 3
    assert PagedKVCache.pages_for_bytes(span, 10 * cache.storage.bytes_per_page, 4) == 10


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_decoding_over_scattered_and_consecutive_pages_agree(
    family: str, tiny_model: Callable[..., Path]
) -> None:
    """A session alone in a step reads consecutive pages as one slice and scattered ones by
    gathering: both give the dense result, token by token."""
    span = load_span(tiny_model(family), 0, 2)
    x = torch.randn(14, 64)
    with torch.no_grad():
        expected = span(x[None])[0]
        for scattered in (False, True):
            cache = PagedKVCache(span, num_pages=16, page_size=2)
            if scattered:  # interleave another session's pages with ours, then free them
                cache.open("other")
            cache.open("s")
            outputs = []
            for t in range(14):
                if scattered and t % 2 == 0:
                    span.step(cache, [StepInput("other", torch.randn(2, 64), t)])
                outputs.append(span.step(cache, [StepInput("s", x[t : t + 1], t)])[0])
            torch.testing.assert_close(torch.cat(outputs), expected, atol=1e-5, rtol=1e-4)
            pages = cache.manager.pages("s")
            consecutive = all(b == a + 1 for a, b in itertools.pairwise(pages))
            assert consecutive is not scattered  # both reading paths were taken
