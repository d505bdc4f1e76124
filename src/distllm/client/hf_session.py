"""A remote inference session as ``transformers`` sees it: a cache object and a synchronous
handle on the async session.

:class:`DistributedSession` drives one :class:`~distllm.client.session.InferenceSession`
from synchronous code, through the runtime's portal. It turns what ``generate`` speaks into what
the swarm speaks:

* the 2D ``attention_mask`` of a left-padded batch -> ``padding`` on the session's first step
  (the servers skip pad tokens; the mask must stay consistent afterwards);
* ``Cache.reorder_cache(beam_idx)`` (beam search, after every step) -> ``hypo_ids`` on the next
  step; reorders compose until a step sends them;
* a prompt-tuned model's prompts (:class:`SessionPrompts`) -> its prefix inserted after each
  row's left padding in the first step, and the deep prompts sent with that step (they cover
  the prefix positions only, which no later step touches). ``generate`` never sees the prefix:
  :attr:`DistributedSession.position` and ``max_length`` count the tokens after it.

:class:`RemoteCache` is what ``generate`` holds as its cache: the KV caches themselves live on
the servers, so it only knows the session (opened on the first forward when ``generate`` opened
it) and how far it went.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from distllm.client.hf_masks import drop_prefix, insert_prefix, left_padding
from distllm.client.hf_runtime import Runtime

if TYPE_CHECKING:
    from distllm.client.planner import RouteHop
    from distllm.client.session import InferenceSession

__all__ = ["DistributedSession", "RemoteCache", "SessionPrompts"]


@dataclass(frozen=True)
class SessionPrompts:
    """What a prompt-tuned model's session starts with: ``prefix`` ``[1, P, h]`` (the first
    block's input at the prefix positions) and ``deep`` prompts ``[num_blocks, 1, P, h]`` or
    ``None``."""

    prefix: torch.Tensor
    deep: torch.Tensor | None


class DistributedSession:
    """One remote inference session, driven synchronously by ``generate`` and ``forward``.

    ``model.inference_session(max_length=N)`` yields one; inside that block every ``generate``
    call continues it: its inputs are *new* tokens, appended to :attr:`output_ids` (what the
    session holds so far), and it returns the whole sequence.
    """

    def __init__(
        self,
        runtime: Runtime,
        session: InferenceSession,
        *,
        max_length: int,
        batch_size: int,
        prompts: SessionPrompts | None = None,
    ) -> None:
        """``session`` has room for ``max_length`` positions after the ``prompts``' prefix."""
        self._runtime = runtime
        self._session = session
        self._prompts = prompts
        #: Positions the prefix takes on the servers in front of every row's tokens.
        self.prefix_length = 0 if prompts is None else int(prompts.prefix.shape[1])
        self.max_length = max_length
        self.batch_size = batch_size
        #: Every token of the session so far ``[batch_size, L]`` (the last generated one is not
        #: sent yet: the next ``generate`` sends it first); ``None`` before any ``generate``.
        self.output_ids: torch.Tensor | None = None
        #: The mask of :attr:`output_ids` when the session is left-padded, else ``None``.
        self.attention_mask: torch.Tensor | None = None
        #: Why ``generate`` cannot continue the session (beam search reordered its rows).
        self.closed_reason: str | None = None
        self._padding: tuple[int, ...] | None = None
        self._hypo_ids: torch.Tensor | None = None  # reorder for the next step, [batch_size]

    @property
    def position(self) -> int:
        """Tokens (pad tokens included) every row has sent through the swarm, not counting a
        prompt-tuned model's prefix."""
        sent = int(self._session.position)
        return sent - self.prefix_length if sent else 0

    @property
    def route(self) -> list[RouteHop]:
        """The servers computing the blocks now, in block order."""
        return self._session.route

    @property
    def padding(self) -> tuple[int, ...] | None:
        """Leading pad tokens per row, fixed by the first step."""
        return self._padding

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` continues from row ``beam_idx[i]`` (applied with the next step)."""
        order = beam_idx.detach().to("cpu", torch.int64)
        self._hypo_ids = order if self._hypo_ids is None else self._hypo_ids[order]
        self.closed_reason = "beam search left its rows out of step with the returned sequences"

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Send ``hidden`` ``[batch_size, n, h]`` (the next ``n`` positions) through the swarm.

        ``attention_mask`` covers the whole session so far, these tokens included (as
        transformers passes it), or is ``None`` when nothing is padded.
        """
        rows, n = hidden.shape[0], hidden.shape[1]
        if rows != self.batch_size:
            raise ValueError(f"{rows} rows sent to a session of batch_size {self.batch_size}")
        position = self.position
        if position + n > self.max_length:
            raise ValueError(
                f"{n} tokens at position {position} exceed the session's max_length "
                f"{self.max_length}: open it with a larger max_length"
            )
        if attention_mask is not None and attention_mask.shape[-1] != position + n:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens; the session holds "
                f"{position} and {n} are new"
            )
        padding = left_padding(attention_mask)
        if position == 0:
            self._padding = padding
        elif padding != self._padding:
            raise ValueError(
                "attention_mask pads this session differently from its first step: only the "
                "first step of a session may be left-padded"
            )
        hypo_ids = self._hypo_ids
        if hypo_ids is not None and torch.equal(hypo_ids, torch.arange(rows)):
            hypo_ids = None
        step = partial(
            self._session.step, hypo_ids=hypo_ids, padding=padding if position == 0 else None
        )
        prompts = self._prompts
        if position == 0 and prompts is not None:
            lead = torch.tensor(padding or (0,) * rows, dtype=torch.long)
            prefix = prompts.prefix.expand(rows, -1, -1)  # [rows, P, h]
            if prompts.deep is not None:
                step = partial(step, prompts=prompts.deep)
            out = self._runtime.call(partial(step, insert_prefix(hidden, prefix, lead)))
            out = drop_prefix(out, lead, self.prefix_length)
        else:
            out = self._runtime.call(partial(step, hidden))
        self._hypo_ids = None  # applied: the servers reordered before this step
        result: torch.Tensor = out
        return result

    def remember(self, sequences: torch.Tensor) -> None:
        """What ``generate`` returned: the next one continues from it (unless beam search
        reordered the rows: then no returned sequence matches a row)."""
        if self.closed_reason is None and sequences.shape[0] != self.batch_size:
            self.closed_reason = f"generate returned {sequences.shape[0]} sequences"
        if self.closed_reason is not None:
            self.output_ids = self.attention_mask = None
            return
        if self._padding is not None:
            self.attention_mask = _padded_mask(self._padding, sequences)
        self.output_ids = sequences

    def continue_with(
        self, inputs: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``generate``'s inputs and mask within this session: what it holds, then ``inputs``
        (new tokens, not padded)."""
        if self.closed_reason is not None:
            raise ValueError(f"generate cannot continue this session: {self.closed_reason}")
        if self.output_ids is None:
            if self.position > 0:
                raise ValueError("this session was stepped by hand: generate cannot continue it")
            return inputs, attention_mask
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("tokens added to a session cannot be padded")
        if inputs is None:
            return self.output_ids, self.attention_mask
        inputs = inputs.to(self.output_ids.device)
        if inputs.shape[0] != self.batch_size:
            raise ValueError(f"{inputs.shape[0]} rows given to a session of {self.batch_size}")
        ids = torch.cat([self.output_ids, inputs], dim=1)
        mask = None
        if self.attention_mask is not None:
            ones = self.attention_mask.new_ones(inputs.shape)
            mask = torch.cat([self.attention_mask, ones], dim=1)
        return ids, mask


def _padded_mask(padding: tuple[int, ...], sequences: torch.Tensor) -> torch.Tensor:
    """The mask of ``sequences``: ``padding[r]`` zeros then ones in row ``r``."""
    mask = torch.ones(sequences.shape, dtype=torch.long, device=sequences.device)
    for row, count in enumerate(padding):
        mask[row, :count] = 0
    return mask


class RemoteCache(Cache):
    """The cache ``generate`` holds: a session on the swarm, where the KV caches live."""

    def __init__(
        self,
        open_session: Callable[[int], DistributedSession] | None = None,
        *,
        session: DistributedSession | None = None,
    ) -> None:
        """Of an open ``session``, or of one ``open_session(rows)`` opens on first use."""
        super().__init__(layers=[])
        self._open = open_session
        self._session = session

    def session(self, rows: int) -> DistributedSession:
        """The session, opened for ``rows`` rows on first use."""
        if self._session is None:
            if self._open is None:
                raise RuntimeError("this cache has no session")
            self._session = self._open(rows)
        return self._session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._session is None else self._session.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self._session is None else self._session.max_length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        if self._session is not None:
            self._session.reorder(beam_idx)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the swarm's caches are reordered and rolled back per step")

    crop = batch_repeat_interleave = batch_select_indices = reset = _unsupported
