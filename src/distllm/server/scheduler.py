"""Which work runs next on the compute thread (pure: no IO, no torch; time comes in as ``now``).

Policy, in order:

1. Inference outranks training. Every batch is built from inference work when there is any:
   all ready decode steps (one token each, oldest first) up to ``max_batch_tokens``, then the
   remaining budget is filled with *chunks* of pending prefills (oldest first, at most
   ``prefill_chunk_tokens`` per prefill per batch). A long prompt therefore advances a chunk at a
   time and can never hold decode steps back for longer than one chunk's compute.
2. Training work (forward/backward of fine-tuning) runs alone, one request per batch, because it
   runs under autograd with different shapes. It waits while inference is pending — except that a
   training request older than ``max_training_wait`` goes first, so a steady stream of inference
   cannot starve fine-tuning forever.
3. Admission is bounded: beyond ``max_queued_items`` (or ``max_queued_tokens``) ``submit`` refuses
   with a retry-after hint; the server answers ``Busy`` rather than queueing forever.

One session has at most one step in the queue (a client waits for a step's output before sending
the next), so decode steps of *different* sessions are what gets batched together.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Batch", "BatchScheduler", "Chunk", "Refusal", "WorkItem", "WorkKind"]


class WorkKind(enum.Enum):
    INFERENCE = "inference"  # a step of a session: decode (1 token) or prefill (many)
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A unit of work as submitted. ``tokens`` counts the positions it computes."""

    key: Hashable  # unique per submission; also how the caller finds its result
    kind: WorkKind
    tokens: int
    session: Hashable | None = None  # inference only: at most one queued item per session

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens!r}")
        if (self.kind is WorkKind.INFERENCE) != (self.session is not None):
            raise ValueError("session must be given for inference work and only for it")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Positions ``[offset, offset + tokens)`` of an item's tokens, computed in this batch."""

    item: WorkItem
    offset: int
    tokens: int

    @property
    def completes_item(self) -> bool:
        return self.offset + self.tokens == self.item.tokens


@dataclass(frozen=True, slots=True)
class Batch:
    chunks: tuple[Chunk, ...]

    @property
    def tokens(self) -> int:
        return sum(chunk.tokens for chunk in self.chunks)

    @property
    def is_training(self) -> bool:
        return self.chunks[0].item.kind is not WorkKind.INFERENCE


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why ``submit`` refused, and when trying again makes sense."""

    reason: str
    retry_after: float


@dataclass(slots=True)
class _Pending:
    item: WorkItem
    enqueued_at: float
    done_tokens: int = 0  # prefix of item.tokens already handed out in earlier batches

    @property
    def remaining(self) -> int:
        return self.item.tokens - self.done_tokens


@dataclass
class BatchScheduler:
    max_batch_tokens: int = 2048
    prefill_chunk_tokens: int = 512
    max_queued_items: int = 1024
    max_queued_tokens: int = 1 << 20
    max_training_wait: float = 5.0
    #: Estimated seconds per queued token, for the retry-after hint of a refusal.
    seconds_per_token: float = 1e-3

    # Invariants: every pending item is in exactly one of the three queues; ``_sessions`` holds
    # the session of every queued inference item; ``_queued_tokens`` = sum of ``remaining``.
    _decode: deque[_Pending] = field(default_factory=deque, init=False)
    _prefill: deque[_Pending] = field(default_factory=deque, init=False)
    _training: deque[_Pending] = field(default_factory=deque, init=False)
    _sessions: set[Hashable] = field(default_factory=set, init=False)
    _keys: set[Hashable] = field(default_factory=set, init=False)
    _queued_tokens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens!r}")
        if not 1 <= self.prefill_chunk_tokens <= self.max_batch_tokens:
            raise ValueError(
                "prefill_chunk_tokens must be in 1..max_batch_tokens, "
                f"got {self.prefill_chunk_tokens!r}"
            )

    def __len__(self) -> int:
        return len(self._decode) + len(self._prefill) + len(self._training)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def submit(self, item: WorkItem, now: float) -> Refusal | None:
        """Queue ``item``; return a :class:`Refusal` instead if the queue is full."""
        if item.key in self._keys:
            raise ValueError(f"work item {item.key!r} is already queued")
        if item.session is not None and item.session in self._sessions:
            raise ValueError(f"session {item.session!r} already has a step queued")
        if len(self) >= self.max_queued_items:
            return Refusal("too many queued requests", self._retry_after())
        if self._queued_tokens + item.tokens > self.max_queued_tokens:
            return Refusal("too many queued tokens", self._retry_after())
        pending = _Pending(item, now)
        if item.kind is not WorkKind.INFERENCE:
            self._training.append(pending)
        elif item.tokens == 1:
            self._decode.append(pending)
        else:
            self._prefill.append(pending)
        if item.session is not None:
            self._sessions.add(item.session)
        self._keys.add(item.key)
        self._queued_tokens += item.tokens
        return None

    def cancel(self, key: Hashable) -> bool:
        """Drop a queued item (its client went away). True if it was queued."""
        for queue in (self._decode, self._prefill, self._training):
            for pending in queue:
                if pending.item.key == key:
                    queue.remove(pending)
                    self._forget(pending)
                    return True
        return False

    def next_batch(self, now: float) -> Batch | None:
        """The next batch to compute, or ``None`` when nothing is queued."""
        if self._training and (
            not (self._decode or self._prefill)
            or now - self._training[0].enqueued_at >= self.max_training_wait
        ):
            pending = self._training.popleft()
            self._forget(pending)
            return Batch((Chunk(pending.item, 0, pending.item.tokens),))
        if not (self._decode or self._prefill):
            return None
        return Batch(tuple(self._take_inference()))

    def _take_inference(self) -> list[Chunk]:
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        while self._decode and budget > 0:
            pending = self._decode.popleft()
            chunks.append(Chunk(pending.item, 0, 1))
            self._forget(pending)
            budget -= 1
        # Prefills share what is left, each at most one chunk per batch, oldest first.
        for pending in list(self._prefill):
            if budget <= 0:
                break
            take = min(pending.remaining, self.prefill_chunk_tokens, budget)
            chunks.append(Chunk(pending.item, pending.done_tokens, take))
            pending.done_tokens += take
            self._queued_tokens -= take
            budget -= take
            if pending.remaining == 0:
                self._prefill.remove(pending)
                self._forget(pending, tokens_left=0)
        return chunks

    def _forget(self, pending: _Pending, tokens_left: int | None = None) -> None:
        self._keys.discard(pending.item.key)
        if pending.item.session is not None:
            self._sessions.discard(pending.item.session)
        self._queued_tokens -= pending.remaining if tokens_left is None else tokens_left

    def _retry_after(self) -> float:
        return max(0.05, self._queued_tokens * self.seconds_per_token)
