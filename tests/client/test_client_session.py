"""Inference sessions through an in-memory swarm equal local ``transformers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from client_harness import hf_greedy, hf_model, swarm_client, tiny_model

from distllm.client.events import RouteChanged
from distllm.client.generation import SamplingParams, generate_ids

pytestmark = pytest.mark.anyio

PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


@pytest.mark.parametrize(
    ("family", "spans"), [("llama", [(0, 1), (1, 3), (3, 4)]), ("bloom", [(0, 2), (2, 4)])]
)
async def test_steps_equal_transformers(root: Path, family: str, spans: list[tuple[int, int]]):
    path = tiny_model(family, root)
    with torch.no_grad():
        reference = hf_model(path)(PROMPT, output_hidden_states=True)
    async with swarm_client(path, spans) as h:
        events: list[object] = []
        async with h.model.inference_session(max_length=16, on_event=events.append) as session:
            assert [(r.start, r.end) for r in session.route] == spans
            hidden = h.model.parts.embed(PROMPT)
            # A prefill of 4 tokens, then one token at a time: the cache carries the rest.
            outputs = [await session.step(hidden[:, :4])]
            for t in range(4, PROMPT.shape[1]):
                outputs.append(await session.step(hidden[:, t : t + 1]))
            assert session.position == PROMPT.shape[1]
            out = torch.cat(outputs, dim=1)
            logits = h.model.parts.logits(out)
        assert events == [RouteChanged("opened", 0, tuple(session.route))]
        # The last hidden state of HF is after the final norm: compare logits, and the
        # pre-norm output through the same head.
        torch.testing.assert_close(logits, reference.logits, atol=1e-4, rtol=1e-3)
        await h.assert_clean()


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_greedy_generate_equals_transformers(root: Path, family: str):
    path = tiny_model(family, root)
    expected = hf_greedy(path, PROMPT, 12)
    async with (
        swarm_client(path, [(0, 2), (2, 4)]) as h,
        h.model.inference_session(max_length=32) as session,
    ):
        tokens = [int(t) async for t in generate_ids(session, PROMPT, 12, SamplingParams())]
    assert tokens == expected


async def test_sampling_with_a_seed_equals_transformers(root: Path):
    path = tiny_model("llama", root)
    hf = hf_model(path)
    settings = {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(1234)
    with torch.no_grad():
        expected = hf.generate(
            PROMPT, max_new_tokens=12, do_sample=True, pad_token_id=3, **settings
        )[0, PROMPT.shape[1] :].tolist()
    params = SamplingParams(do_sample=True, seed=1234, **settings)  # type: ignore[arg-type]
    async with (
        swarm_client(path, [(0, 2), (2, 4)]) as h,
        h.model.inference_session(max_length=32) as session,
    ):
        tokens = [int(t) async for t in generate_ids(session, PROMPT, 12, params)]
    assert tokens == expected[: len(tokens)]
    assert len(tokens) == len(expected) or tokens[-1] == 2  # stopped at EOS, as HF did


async def test_generate_streams_text_and_continues_the_session(root: Path):
    path = tiny_model("llama", root)
    tokenizer = hf_model(path)  # noqa: F841 (loads the reference once)
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        tok = h.model.tokenizer
        assert tok is not None
        prompt = "The cat"
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        expected = hf_greedy(path, ids, 10)
        async with h.model.inference_session(max_length=64) as session:
            first = "".join(
                [p async for p in session.generate(prompt, max_new_tokens=4, stop_at_eos=False)]
            )
            second = "".join(
                [p async for p in session.generate("", max_new_tokens=6, stop_at_eos=False)]
            )
        # Two calls continue one session exactly as one call of 10 tokens would.
        assert first + second == tok.decode(expected, skip_special_tokens=True)
        assert session.position == ids.shape[1] + 9  # the last token is not fed yet
        await h.assert_clean()


async def test_step_rejects_bad_input_without_touching_the_session(root: Path):
    path = tiny_model("llama", root)
    async with (
        swarm_client(path, [(0, 4)]) as h,
        h.model.inference_session(max_length=8) as session,
    ):
        hidden = h.model.parts.embed(PROMPT)
        with pytest.raises(ValueError, match="exceed max_length 8"):
            await session.step(torch.cat([hidden, hidden], dim=1))
        with pytest.raises(ValueError, match="hidden must be"):
            await session.step(hidden[0])
        await session.step(hidden)
        with pytest.raises(ValueError, match="start_from_position must be"):
            await session.step(hidden[:, :1], start_from_position=7)
        out = await session.step(hidden[:, :2], start_from_position=2)  # a rollback
        assert out.shape == (1, 2, h.model.hidden_size) and session.position == 4
