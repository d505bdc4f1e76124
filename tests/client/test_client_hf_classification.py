"""``DistributedModelForSequenceClassification``: logits, losses and gradients equal those of
``transformers``' ``AutoModelForSequenceClassification`` with the same score weights (padded
rows, classification and regression, with and without prompts); a training step changes only
the score head and the prompts; PEFT LoRA on the score head."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from anyio.from_thread import start_blocking_portal
from hf_harness import swarm_and_client
from test_client_hf_tuning import LocalTuned
from transformers import AutoModelForSequenceClassification

from distllm.client.hf_classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedModelForSequenceClassification,
)
from distllm.testing.models import make_tiny_model

TOL = {"rtol": 1e-4, "atol": 1e-5}
PAD = 3  # the tiny tokenizer's <pad>


@contextmanager
def classifier(
    path: Path, backend: str = "asyncio", **kwargs: Any
) -> Iterator[DistributedModelForSequenceClassification]:
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(swarm_and_client(path, [(0, 2), (2, 4)])) as (_, client),
        AutoDistributedModelForSequenceClassification.from_pretrained(
            path, client=client, portal=portal, **kwargs
        ) as model,
    ):
        model.config.pad_token_id = PAD
        yield model


@pytest.fixture(scope="module", params=["llama", "bloom"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _reference(path: Path, model: DistributedModelForSequenceClassification) -> Any:
    """transformers' classifier of the same checkpoint with ``model``'s score weights."""
    reference = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=model.num_labels, pad_token_id=PAD
    ).eval()
    reference.requires_grad_(False)
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)
    reference.score.weight.requires_grad_(True)
    return reference


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows (pads are ``PAD``) and their mask."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 128, (4, 6), generator=generator)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_logits_loss_and_grads_equal_transformers(checkpoint: Path, backend: str) -> None:
    with classifier(checkpoint, backend, num_labels=3) as model:
        reference = _reference(checkpoint, model)
        ids, mask = _batch()
        labels = torch.tensor([0, 2, 1, 2])
        out = model(ids, attention_mask=mask, labels=labels)
        expected = reference(ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (4, 3)
        torch.testing.assert_close(out.logits, expected.logits, **TOL)
        torch.testing.assert_close(out.loss, expected.loss, **TOL)
        out.loss.backward()
        expected.loss.backward()
        assert model.score.weight.grad is not None
        torch.testing.assert_close(model.score.weight.grad, reference.score.weight.grad, **TOL)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable == ["score.weight"]
        # without a pad token, the mask finds each row's last token (transformers cannot)
        model.config.pad_token_id = None
        with torch.no_grad():
            by_mask = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(by_mask, expected.logits, **TOL)


def test_regression(checkpoint: Path) -> None:
    with classifier(checkpoint, num_labels=1) as model:
        reference = _reference(checkpoint, model)
        ids, mask = _batch()
        labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
        out = model(ids, attention_mask=mask, labels=labels)
        expected = reference(ids, attention_mask=mask, labels=labels)
        assert model.config.problem_type == "regression"
        torch.testing.assert_close(out.logits, expected.logits, **TOL)
        torch.testing.assert_close(out.loss, expected.loss, **TOL)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuned_classifier_trains_like_local(checkpoint: Path, mode: str) -> None:
    with classifier(checkpoint, num_labels=2, tuning_mode=mode, pre_seq_len=2) as model:
        assert model.ptune is not None
        reference = _reference(checkpoint, model)
        local = LocalTuned(reference, copy.deepcopy(model.ptune))
        ours_params = [p for p in model.parameters() if p.requires_grad]
        theirs_params = [*local.tuning.parameters(), reference.score.weight]  # same order
        ours = torch.optim.Adam(ours_params, lr=0.05)
        theirs = torch.optim.Adam(theirs_params, lr=0.05)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids, mask = _batch()
        labels = torch.tensor([0, 1, 1, 0])
        model.train()
        for _ in range(3):
            ours.zero_grad()
            theirs.zero_grad()
            out = model(ids, attention_mask=mask, labels=labels)
            hidden = local.hidden_states(ids, mask)  # [b, T, h], after the final norm
            last = mask.sum(dim=1) - 1  # right padding: the last real token
            logits = reference.score(hidden[torch.arange(4), last])
            loss = torch.nn.functional.cross_entropy(logits, labels)
            torch.testing.assert_close(out.logits, logits, **TOL)
            torch.testing.assert_close(out.loss, loss, **TOL)
            out.loss.backward()
            loss.backward()
            ours.step()
            theirs.step()
        for mine, theirs_p in zip(ours_params, theirs_params, strict=True):
            torch.testing.assert_close(mine, theirs_p, rtol=1e-4, atol=1e-5)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        expected = {"score.weight", "ptune.prompt_embeddings"}
        if mode == "deep_ptune":
            expected.add("ptune.deep_prompt_embeddings")
        assert changed == expected


def test_lora_on_the_score_head(checkpoint: Path) -> None:
    peft = pytest.importorskip("peft")
    with classifier(checkpoint, num_labels=2) as model:
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["score"], lora_dropout=0.0)
        tuned = peft.get_peft_model(model, config)
        trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        optimizer = torch.optim.Adam(trainable.values(), lr=0.05)
        ids, mask = _batch()
        labels = torch.tensor([0, 1, 1, 0])
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        with_grad = [n for n, p in tuned.named_parameters() if p.grad is not None]
        assert with_grad and all("lora_" in n for n in with_grad)


def test_arguments_are_checked(checkpoint: Path) -> None:
    lent: Any = object()
    load = DistributedModelForSequenceClassification.from_pretrained
    with pytest.raises(ValueError, match="num_labels"):
        load(checkpoint, client=lent, portal=lent, num_labels=0)
    with pytest.raises(ValueError, match="tuning_mode"):
        load(checkpoint, client=lent, portal=lent, tuning_mode="lora", pre_seq_len=1)
