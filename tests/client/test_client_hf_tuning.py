"""Fine-tuning through the HF face: prompt tuning and deep prompt tuning train exactly as the same
steps run locally in ``transformers`` (a hand-built reference: frozen model, the same prompt
embeddings prepended, deep prompts added by pre-hooks on its decoder layers); padded rows;
``generate`` with the prompts; client-side LoRA with plain PEFT; a server-hosted adapter."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import distributed
from transformers import AutoModelForCausalLM

from distllm.client.hf import DistributedModelForCausalLM
from distllm.client.ptune import PromptTuning
from distllm.testing.models import hf_blocks, make_tiny_lora, make_tiny_model

TOL = {"rtol": 1e-4, "atol": 1e-5}
SPANS = [(0, 1), (1, 3), (3, 4)]
PRE_SEQ_LEN = 3


@pytest.fixture(scope="module", params=["llama", "bloom"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    reference.requires_grad_(False)
    return path, reference


class LocalTuned:
    """The reference: ``reference`` (frozen) with ``tuning``'s prefix prepended to the word
    embeddings and its deep prompts added before each decoder layer."""

    def __init__(self, reference: Any, tuning: PromptTuning) -> None:
        self.reference = reference
        self.tuning = tuning

    @contextmanager
    def _deep_hooks(self, deep: torch.Tensor | None) -> Iterator[None]:
        if deep is None:
            yield
            return
        size = deep.shape[2]

        def adder(i: int) -> Any:
            def hook(module: Any, args: Any, kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                pad = hidden.new_zeros(hidden.shape[0], hidden.shape[1] - size, hidden.shape[2])
                hidden = hidden + torch.cat([deep[i].expand(hidden.shape[0], -1, -1), pad], 1)
                if args:
                    return (hidden, *args[1:]), kwargs
                kwargs["hidden_states"] = hidden
                return args, kwargs

            return hook

        handles = [
            block.register_forward_pre_hook(adder(i), with_kwargs=True)
            for i, block in enumerate(hf_blocks(self.reference))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run(self, module: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
        batch = ids.shape[0]
        prefix, deep = self.tuning(batch)
        embeds = self.reference.get_input_embeddings()(ids)
        inputs = torch.cat([prefix, embeds], dim=1)
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([mask.new_ones(batch, prefix.shape[1]), mask], dim=1)
        with self._deep_hooks(deep):
            return module(inputs_embeds=inputs, attention_mask=full_mask)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``ids`` (right-padded by ``mask``) with the prompts in front."""
        out = self._run(self.reference, ids, mask)
        logits: torch.Tensor = out.logits[:, self.tuning.pre_seq_len :].contiguous()
        return logits

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's output (after the final norm) at the tokens of ``ids``."""
        out = self._run(self.reference.base_model, ids, mask)
        hidden: torch.Tensor = out.last_hidden_state[:, self.tuning.pre_seq_len :]
        return hidden

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(ids, mask)
        loss: torch.Tensor = self.reference.loss_function(
            logits=logits, labels=labels, vocab_size=self.reference.config.vocab_size
        )
        return loss

    def greedy(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(steps):
                token = self.logits(ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, token], dim=1)
        return ids


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows with labels (``-100`` at the pads)."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 128, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 3
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize(
    ("mode", "backend"), [("ptune", "asyncio"), ("deep_ptune", "asyncio"), ("deep_ptune", "trio")]
)
def test_prompt_tuning_steps_equal_local_training(family: Any, mode: str, backend: str) -> None:
    path, reference = family
    tuned = {"tuning_mode": mode, "pre_seq_len": PRE_SEQ_LEN}
    with distributed(path, SPANS, backend, **tuned) as (model, _):
        assert model.ptune is not None
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        expected = ["ptune.prompt_embeddings"]
        if mode == "deep_ptune":
            expected.append("ptune.deep_prompt_embeddings")
            assert not model.ptune.deep_prompt_embeddings.detach().any()  # starts neutral
        assert trainable == expected
        local = LocalTuned(reference, copy.deepcopy(model.ptune))
        ours = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        theirs = torch.optim.Adam(local.tuning.parameters(), lr=0.05)
        ids, mask, labels = _batch()
        model.train()
        losses = []
        for _ in range(3):
            ours.zero_grad()
            theirs.zero_grad()
            loss = model(ids, attention_mask=mask, labels=labels).loss
            expected_loss = local.loss(ids, mask, labels)
            torch.testing.assert_close(loss, expected_loss, **TOL)
            loss.backward()
            expected_loss.backward()
            for mine, reference_param in zip(
                model.ptune.parameters(), local.tuning.parameters(), strict=True
            ):
                assert mine.grad is not None and reference_param.grad is not None
                torch.testing.assert_close(mine.grad, reference_param.grad, **TOL)
            ours.step()
            theirs.step()
            losses.append(loss.item())
        for mine, reference_param in zip(
            model.ptune.parameters(), local.tuning.parameters(), strict=True
        ):
            torch.testing.assert_close(mine, reference_param, rtol=1e-4, atol=1e-5)
        assert losses[-1] < losses[0]
        # the frozen local parts got no gradient
        assert model.lm_head.weight.grad is None and model.embed_tokens.weight.grad is None


def test_left_padded_rows_see_the_prefix_after_their_pads(family: Any) -> None:
    path, reference = family
    with distributed(path, SPANS, tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN) as (m, _):
        assert m.ptune is not None
        with torch.no_grad():
            m.ptune.deep_prompt_embeddings.normal_(0, 0.1)  # not neutral
        local = LocalTuned(reference, m.ptune)
        ids = torch.randint(4, 128, (2, 6))
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            logits = m(ids, attention_mask=mask).logits
            assert logits.shape == (2, 6, 128)
            torch.testing.assert_close(logits[0, 2:], local.logits(ids[:1, 2:])[0], **TOL)
            torch.testing.assert_close(logits[1], local.logits(ids[1:])[0], **TOL)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_generate_with_prompts_equals_local(family: Any, backend: str) -> None:
    path, reference = family
    tuned = {"tuning_mode": "ptune", "pre_seq_len": PRE_SEQ_LEN}
    with distributed(path, backend=backend, **tuned) as (model, _):
        assert model.ptune is not None
        local = LocalTuned(reference, model.ptune)
        prompt = torch.tensor([[1, 40, 52, 77, 60]])
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(out, local.greedy(prompt, 6), rtol=0, atol=0)
        # a left-padded batch: each row as if alone
        batch = torch.tensor([[3, 3, 1, 40, 52], [1, 70, 33, 41, 90]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(out[0, 2:], local.greedy(batch[:1, 2:], 4)[0], rtol=0, atol=0)
        torch.testing.assert_close(out[1], local.greedy(batch[1:], 4)[0], rtol=0, atol=0)
        # a session continued by a second generate keeps its prefix
        with model.inference_session(max_length=20) as session:
            first = model.generate(prompt, max_new_tokens=3, do_sample=False)
            assert session.position == first.shape[1] - 1  # the prefix is not counted
            second = model.generate(torch.tensor([[44]]), max_new_tokens=3, do_sample=False)
        whole = torch.cat([first, torch.tensor([[44]])], dim=1)
        torch.testing.assert_close(second, local.greedy(whole, 3), rtol=0, atol=0)


def test_generate_with_deep_prompts(family: Any) -> None:
    path, reference = family
    with distributed(path, tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN) as (model, _):
        assert model.ptune is not None
        with torch.no_grad():
            model.ptune.deep_prompt_embeddings.normal_(0, 0.1)
        prompt = torch.tensor([[1, 40, 52, 77, 60]])
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        local = LocalTuned(reference, model.ptune)
        torch.testing.assert_close(out, local.greedy(prompt, 6), rtol=0, atol=0)


def test_tuning_arguments_are_checked(family: Any) -> None:
    path, _ = family
    load = DistributedModelForCausalLM.from_pretrained
    lent: Any = object()  # checked before the client is touched
    with pytest.raises(ValueError, match="tuning_mode must be"):
        load(path, client=lent, portal=lent, tuning_mode="prefix", pre_seq_len=2)
    with pytest.raises(ValueError, match="pre_seq_len >= 1"):
        load(path, client=lent, portal=lent, tuning_mode="ptune")
    with pytest.raises(ValueError, match="needs a tuning_mode"):
        load(path, client=lent, portal=lent, pre_seq_len=4)


def test_prompt_tuning_module() -> None:
    tuning = PromptTuning(hidden_size=8, num_blocks=3, pre_seq_len=4, mode="deep_ptune")
    prefix, deep = tuning(5)
    assert prefix.shape == (5, 4, 8) and deep is not None and deep.shape == (3, 1, 4, 8)
    assert not deep.detach().any()
    assert 0.005 < float(tuning.prompt_embeddings.detach().std()) < 0.05  # N(0, 0.02)
    embeddings = torch.nn.Embedding(10, 8)
    tuning.init_from_embeddings(embeddings, [2, 5])
    expected = embeddings(torch.tensor([2, 5, 2, 5])).detach()
    torch.testing.assert_close(tuning.prompt_embeddings.detach(), expected)
    shallow = PromptTuning(hidden_size=8, num_blocks=3, pre_seq_len=2)
    assert shallow(1)[1] is None and shallow.deep_prompt_embeddings is None


def test_client_side_lora_with_peft(family: Any) -> None:
    """(a) of the fine-tuning story: LoRA on the local LM head is plain PEFT, and trains as
    the same adapter on the local model does."""
    peft = pytest.importorskip("peft")
    path, reference = family
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.0)
    with distributed(path, SPANS) as (model, _):
        assert isinstance(model, DistributedModelForCausalLM)
        tuned = peft.get_peft_model(model, config)
        local = peft.get_peft_model(copy.deepcopy(reference), copy.deepcopy(config))
        ours_named = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
        theirs_named = {n: p for n, p in local.named_parameters() if p.requires_grad}
        assert ours_named and all("lora_" in name for name in ours_named)
        with torch.no_grad():  # the same adapter weights on both sides (B: non-zero)
            for (_, mine), (_, theirs) in zip(
                sorted(ours_named.items()), sorted(theirs_named.items()), strict=True
            ):
                mine.normal_(0, 0.1)
                theirs.copy_(mine)
        ours = torch.optim.Adam(ours_named.values(), lr=0.01)
        theirs = torch.optim.Adam(theirs_named.values(), lr=0.01)
        ids, mask, labels = _batch()
        losses = []
        for _ in range(3):
            ours.zero_grad()
            theirs.zero_grad()
            loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
            expected = local(input_ids=ids, attention_mask=mask, labels=labels).loss
            torch.testing.assert_close(loss, expected, **TOL)
            loss.backward()
            expected.backward()
            ours.step()
            theirs.step()
            losses.append(loss.item())
        for (_, mine), (_, theirs_p) in zip(
            sorted(ours_named.items()), sorted(theirs_named.items()), strict=True
        ):
            torch.testing.assert_close(mine, theirs_p, rtol=1e-4, atol=1e-5)
        assert losses[-1] < losses[0]
        frozen = [n for n, p in tuned.named_parameters() if p.grad is not None]
        assert frozen and all("lora_" in name for name in frozen)


@contextmanager
def _swarm_with_adapter(path: Path, lora: Path, **kwargs: Any) -> Iterator[Any]:
    """A model of ``path`` on two servers that both host ``lora`` as adapter ``"a"``."""
    from anyio.from_thread import start_blocking_portal

    from distllm.client import Client
    from distllm.identity import Identity
    from distllm.testing.swarm import TEST_SERVER_CONFIG, local_swarm

    config = dataclasses.replace(TEST_SERVER_CONFIG, adapters=(("a", lora),))

    @asynccontextmanager
    async def swarm_and_client() -> AsyncIterator[Client]:
        async with local_swarm(path, [(0, 2), (2, 4)], server_config=config) as swarm:
            identity = Identity.generate()
            async with (
                swarm.network.endpoint(identity, swarm.transport_config) as transport,
                Client(swarm.initial_peers, identity=identity, transport=transport) as client,
            ):
                yield client

    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(swarm_and_client()) as client,
        DistributedModelForCausalLM.from_pretrained(
            path, client=client, portal=portal, **kwargs
        ) as model,
    ):
        yield model


def test_server_hosted_adapter(family: Any, tmp_path: Path) -> None:
    """``adapter="a"``: forwards, backwards and sessions all run the servers' LoRA adapter --
    the same as transformers with that adapter merged, prompts included."""
    from peft import PeftModel

    path, _ = family
    lora = make_tiny_lora(path, tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(path)
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload().eval()
    merged.requires_grad_(False)
    tuned = {"tuning_mode": "deep_ptune", "pre_seq_len": PRE_SEQ_LEN}
    with _swarm_with_adapter(path, lora, adapter="a", **tuned) as model:
        assert model.ptune is not None and model.adapter == "a"
        local = LocalTuned(merged, copy.deepcopy(model.ptune))
        ids, mask, labels = _batch()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        expected = local.loss(ids, mask, labels)
        torch.testing.assert_close(loss, expected, **TOL)
        loss.backward()
        expected.backward()
        for mine, theirs in zip(model.ptune.parameters(), local.tuning.parameters(), strict=True):
            assert mine.grad is not None and theirs.grad is not None
            torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
    with _swarm_with_adapter(path, lora, adapter="a", tuning_mode="ptune", pre_seq_len=2) as m:
        assert m.ptune is not None
        local = LocalTuned(merged, m.ptune)
        prompt = torch.tensor([[1, 40, 52, 77, 60]])
        out = m.generate(prompt, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(out, local.greedy(prompt, 5), rtol=0, atol=0)
