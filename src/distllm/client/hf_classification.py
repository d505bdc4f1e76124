"""Sequence classification over a swarm: ``transformers``' ``*ForSequenceClassification`` with
the blocks on the servers.

    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        MODEL, initial_peers=[ADDR], num_labels=2, tuning_mode="ptune", pre_seq_len=16
    )
    out = model(input_ids, attention_mask=mask, labels=labels)  # out.loss, out.logits [b, 2]
    out.loss.backward()  # gradients reach model.score and the prompts

Like ``LlamaForSequenceClassification``: the local embeddings feed the swarm's blocks, the final
norm runs here, and a ``score`` ``Linear(h, num_labels, bias=False)`` (new, trainable, drawn from
``N(0, initializer_range^2)``) reads the hidden state of each row's last real token. The LM head
is not used. The local pretrained parts are frozen; ``score`` and the prompts train.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from distllm.client.hf import DistributedPreTrainedModel
from distllm.client.hf_runtime import Runtime

if TYPE_CHECKING:
    from distllm.client.model import RemoteModel

__all__ = [
    "AutoDistributedModelForSequenceClassification",
    "DistributedModelForSequenceClassification",
]

_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    """A sequence classifier (or regressor) of any supported family whose blocks are served by
    a swarm. Build it with :meth:`from_pretrained`; close it with :meth:`close`."""

    def __init__(
        self,
        config: PretrainedConfig,
        remote: RemoteModel,
        runtime: Runtime,
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
    ) -> None:
        super().__init__(
            config,
            remote,
            runtime,
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            adapter=adapter,
        )
        self._freeze_local_parts()
        self.num_labels = int(config.num_labels or 2)
        weight = self.embed_tokens.weight
        self.score = nn.Linear(
            remote.hidden_size,
            self.num_labels,
            bias=False,
            dtype=weight.dtype,
            device=weight.device,
        )
        std = float(getattr(config, "initializer_range", 0.02))
        nn.init.normal_(self.score.weight, mean=0.0, std=std)
        self.eval()  # type: ignore[no-untyped-call]

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: str | Path,
        *,
        num_labels: int | None = None,
        problem_type: str | None = None,
        **kwargs: Any,
    ) -> DistributedModelForSequenceClassification:
        """Like :meth:`DistributedModelForCausalLM.from_pretrained
        <distllm.client.hf.DistributedPreTrainedModel.from_pretrained>`, plus ``num_labels``
        (default: the config's, 2) and ``problem_type`` (``"regression"``,
        ``"single_label_classification"``, ``"multi_label_classification"``; default: guessed
        from ``num_labels`` and the labels, as transformers does)."""
        if problem_type is not None and problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {_PROBLEM_TYPES}")
        if num_labels is not None and not (isinstance(num_labels, int) and num_labels >= 1):
            raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
        updates = {"num_labels": num_labels, "problem_type": problem_type}
        kwargs["config_updates"] = {k: v for k, v in updates.items() if v is not None}
        return super().from_pretrained(model, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """Pooled logits ``[b, num_labels]`` of ``input_ids`` ``[b, T]`` (rows left- or
        right-padded), and the loss for ``labels`` (class ids ``[b]`` -- cross-entropy; floats
        -- MSE for ``num_labels == 1``, else BCE with logits), as transformers computes it.

        Each row is read at its last real token: as in transformers, the rightmost token that
        is not ``config.pad_token_id`` when ``input_ids`` are given and the config names a pad
        token; else the last position the ``attention_mask`` keeps; else the last position.
        """
        del position_ids, kwargs  # positions: implied by padding
        hidden = self._hidden_states(input_ids, inputs_embeds, attention_mask)  # [b, T, h]
        batch = hidden.shape[0]
        last = self._last_tokens(input_ids, attention_mask, batch, hidden.shape[1])  # [b]
        pooled = hidden[torch.arange(batch, device=hidden.device), last]  # [b, h]
        logits = self.score(self.final_norm(pooled))  # [b, num_labels]
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(
                labels=labels, pooled_logits=logits, config=self.config
            )
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def _last_tokens(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        batch: int,
        length: int,
    ) -> torch.Tensor:
        positions = torch.arange(length)
        pad = self.config.pad_token_id
        if input_ids is not None and pad is not None:
            keep = (input_ids != pad).to("cpu", torch.int64)  # [b, T]
        elif attention_mask is not None:
            keep = (attention_mask != 0).to("cpu", torch.int64)
        else:
            return torch.full((batch,), length - 1, dtype=torch.long)
        last: torch.Tensor = (positions[None, :] * keep).argmax(-1)  # rightmost kept position
        return last

    def get_output_embeddings(self) -> None:
        return None


class AutoDistributedModelForSequenceClassification:
    """``transformers.AutoModelForSequenceClassification``'s counterpart."""

    @classmethod
    def from_pretrained(
        cls, model: str | Path, **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        """See :meth:`DistributedModelForSequenceClassification.from_pretrained`."""
        return DistributedModelForSequenceClassification.from_pretrained(model, **kwargs)
