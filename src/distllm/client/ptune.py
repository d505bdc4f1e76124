"""Prompt tuning on the client: trainable prompts, while the swarm's blocks stay frozen.

Two modes, as in P-Tuning v2 (Liu et al., 2021) and Petals:

* ``"ptune"``: ``pre_seq_len`` trainable vectors in the word-embedding space, prepended to every
  row's token embeddings (before BLOOM's embedding norm, like any token's embedding);
* ``"deep_ptune"``: those, plus per-block *deep prompts* ``[num_blocks, pre_seq_len, h]`` that
  are added, before block ``i``, to the hidden states of the first ``pre_seq_len`` positions
  (the prefix) -- :meth:`distllm.model.span.SpanModel.forward` and the servers' inference steps
  do that addition, so only the prompts travel, never a block's weights.

Initialisation: the prefix embeddings are drawn from ``N(0, init_std^2)`` with ``init_std``
defaulting to the checkpoint's ``initializer_range`` (0.02 when the config has none) -- the
scale transformers draws embeddings from. The deep prompts start at zero, so a freshly made
``deep_ptune`` model computes exactly what a ``ptune`` one does: training moves them away from
neutral. :meth:`PromptTuning.init_from_embeddings` starts the prefix from real tokens' embeddings
instead (often a better start for small models).

    tuning = PromptTuning(hidden_size=576, num_blocks=30, pre_seq_len=16, mode="deep_ptune")
    prefix, deep = tuning(batch_size=8)  # [8, 16, 576], [30, 1, 16, 576]
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import torch
from torch import nn

__all__ = ["TUNING_MODES", "PromptTuning", "TuningMode"]

TuningMode = Literal["ptune", "deep_ptune"]
#: The accepted values of ``tuning_mode``.
TUNING_MODES: Final[tuple[str, ...]] = get_args(TuningMode)

#: Standard deviation of the prefix embeddings when the config names none.
DEFAULT_INIT_STD: Final = 0.02


class PromptTuning(nn.Module):
    """Trainable prompts: ``prompt_embeddings`` ``[pre_seq_len, h]`` and, in ``deep_ptune``
    mode, ``deep_prompt_embeddings`` ``[num_blocks, pre_seq_len, h]`` (else ``None``)."""

    prompt_embeddings: nn.Parameter
    deep_prompt_embeddings: nn.Parameter | None

    def __init__(
        self,
        *,
        hidden_size: int,
        num_blocks: int,
        pre_seq_len: int,
        mode: str = "ptune",
        init_std: float = DEFAULT_INIT_STD,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if not (isinstance(pre_seq_len, int) and pre_seq_len >= 1):
            raise ValueError(f"pre_seq_len must be an int >= 1, got {pre_seq_len!r}")
        if hidden_size < 1 or num_blocks < 1:
            raise ValueError(f"hidden_size {hidden_size} and num_blocks {num_blocks} must be >= 1")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        self.mode: TuningMode = mode  # type: ignore[assignment]  # checked just above
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.pre_seq_len = pre_seq_len
        self.init_std = init_std
        prefix = torch.empty(pre_seq_len, hidden_size, dtype=dtype, device=device)
        self.prompt_embeddings = nn.Parameter(prefix.normal_(0.0, init_std))
        self.deep_prompt_embeddings = None
        if mode == "deep_ptune":
            deep = torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype, device=device)
            self.deep_prompt_embeddings = nn.Parameter(deep)

    @property
    def deep(self) -> bool:
        """Whether there are per-block deep prompts."""
        return self.deep_prompt_embeddings is not None

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: nn.Embedding, token_ids: list[int]) -> None:
        """Start the prefix from the embeddings of ``token_ids`` (repeated to fill
        ``pre_seq_len``), e.g. of a task description."""
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        ids = torch.tensor(token_ids, dtype=torch.long, device=embeddings.weight.device)
        repeats = -(-self.pre_seq_len // len(token_ids))  # ceil
        rows = embeddings(ids.repeat(repeats)[: self.pre_seq_len])  # [P, h]
        self.prompt_embeddings.copy_(rows.to(self.prompt_embeddings))

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prefix ``[batch_size, pre_seq_len, h]`` (one copy per row, a broadcast view)
        and the deep prompts ``[num_blocks, 1, pre_seq_len, h]`` (``None`` in ``ptune`` mode;
        batch 1 broadcasts over every row, as the servers accept)."""
        prefix = self.prompt_embeddings.unsqueeze(0).expand(batch_size, -1, -1)  # [b, P, h]
        deep = self.deep_prompt_embeddings
        return prefix, (None if deep is None else deep.unsqueeze(1))  # [num_blocks, 1, P, h]

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, pre_seq_len={self.pre_seq_len}, hidden_size={self.hidden_size}"
            f", num_blocks={self.num_blocks}, init_std={self.init_std:g}"
        )
