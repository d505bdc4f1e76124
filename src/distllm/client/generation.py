"""Token generation over an inference session: sampling and streamed text.

**Sampling procedure** (the one Hugging Face ``generate`` applies, so that the same seed gives
the same tokens): the last position's logits, in float32, per row --

- greedy (``do_sample=False``): ``argmax`` (the first maximum on ties);
- sampling: divide by ``temperature`` (when != 1); keep the ``top_k`` largest (when set; the
  others become -inf, ties with the k-th kept); keep the smallest set of tokens whose
  probabilities sum to more than ``top_p`` (when set and < 1; sorted ascending, a token is
  dropped while the cumulative probability up to it is <= 1 - top_p; the most likely token is
  always kept); softmax; one ``torch.multinomial`` draw per row from a ``torch.Generator``
  seeded with ``seed`` (a random seed when ``None``), created afresh by each ``generate`` call.

Hugging Face ``generate(do_sample=True, ...)`` after ``torch.manual_seed(seed)`` draws from the
global generator in the same state, so it yields the same tokens -- pass it the same
``temperature``, ``top_k`` (its default is 50; ``top_k=0`` there means none) and ``top_p``.

**Continuation**: the last sampled token is not fed through the swarm until it is needed: it
stays in ``session.pending_ids`` and goes first in the next ``generate`` call, so several calls
continue one session exactly as one long call would.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distllm.client.session import InferenceSession

__all__ = ["Sampler", "SamplingParams", "TextStream", "generate_ids", "generate_text"]

#: Tokens before the new ones that the text decoder sees again (word boundaries, spaces).
_CONTEXT_TOKENS = 5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen (see the module doc)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")


class Sampler:
    """Chooses next tokens from logits ``[rows, vocab]`` -> ``[rows]`` (int64)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8)) >> 1
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.to(torch.float32)
        p = self.params
        if not p.do_sample:
            return scores.argmax(dim=-1)
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k is not None:
            k = min(p.top_k, scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p is not None and p.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - p.top_p
            drop_sorted[..., -1] = False  # the most likely token always stays
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, -math.inf)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into text pieces, never cutting a character in half.

    Each piece is what decoding gained since the last one; the decoder sees a few tokens before
    the new ones again, so tokenizers that attach spaces to words place them right.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context)
        self._read = len(self._ids)  # ids up to here are emitted
        self._prefix = max(self._read - _CONTEXT_TOKENS, 0)  # the decoder's context starts here

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        now = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""  # nothing yet, or a multi-byte character still incomplete
        self._prefix = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read = len(self._ids)
        return str(now[len(before) :])


async def generate_ids(
    session: InferenceSession,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    *,
    stop_at_eos: bool = True,
) -> AsyncIterator[torch.Tensor]:
    """Yield ``max_new_tokens`` next tokens ``[batch_size]`` after ``input_ids``
    ``[batch_size, T]`` (after ``session.pending_ids`` first). With ``stop_at_eos`` it stops
    once every row has produced an end-of-sequence token."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    ids = torch.as_tensor(input_ids, dtype=torch.int64)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != session.batch_size:
        raise ValueError(
            f"input_ids must be [{session.batch_size}, T], got {list(input_ids.shape)}"
        )
    if session.pending_ids is not None:
        ids = torch.cat([session.pending_ids, ids], dim=1)
    if not ids.shape[1] and max_new_tokens:
        raise ValueError("nothing to generate from: give a prompt")
    parts = session.model.parts
    sampler = Sampler(params)
    eos = _eos_ids(session.model)
    finished = torch.zeros(session.batch_size, dtype=torch.bool)
    for _ in range(max_new_tokens):
        session.pending_ids = ids  # not fed yet (kept if this step fails)
        with torch.no_grad():
            hidden = parts.embed(ids)
        out = await session.step(hidden)
        session.pending_ids = None
        with torch.no_grad():
            logits = parts.logits(out[:, -1:, :])[:, -1, :]
        token = sampler(logits)
        session.pending_ids = ids = token[:, None]
        yield token
        if stop_at_eos and eos:
            finished |= torch.isin(token, torch.tensor(sorted(eos)))
            if bool(finished.all()):
                return


async def generate_text(
    session: InferenceSession,
    prompt: str | torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    *,
    stop_at_eos: bool = True,
) -> AsyncIterator[str]:
    """The text of the tokens :func:`generate_ids` yields for one row, piece by piece."""
    tokenizer = session.model.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {session.model.name!r} has no tokenizer: use generate_ids")
    if session.batch_size != 1:
        raise ValueError("text generation streams one row: open the session with batch_size=1")
    if isinstance(prompt, str):
        fresh = session.position == 0 and session.pending_ids is None
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=fresh)
        input_ids = encoded["input_ids"]
    else:
        input_ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(1, -1)
    context = input_ids[0].tolist()
    if session.pending_ids is not None:
        context = session.pending_ids[0].tolist() + context
    stream = TextStream(tokenizer, context)
    async for token in generate_ids(
        session, input_ids, max_new_tokens, params, stop_at_eos=stop_at_eos
    ):
        piece = stream.push(int(token[0]))
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail


def _eos_ids(model: Any) -> set[int]:
    value = getattr(model.config, "eos_token_id", None)
    if value is None and model.tokenizer is not None:
        value = getattr(model.tokenizer, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}
