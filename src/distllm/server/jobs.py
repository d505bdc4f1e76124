"""Work submitted to the compute loop, and the way its outcome gets back to the waiting call.

A job is created and resolved on the event loop; between the two, the compute thread reads its
inputs and fills its scratch fields (decoded tensors, the output being assembled) -- never at the
same time as the loop touches them, since the loop waits for each batch to come back.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import anyio
import torch

from distllm.protocol.span_messages import BackwardRequest, ForwardRequest, InferenceStep
from distllm.protocol.span_session import StepPlan
from distllm.server.scheduler import WorkItem, WorkKind

__all__ = ["InferenceJob", "Job", "TrainingJob"]


@dataclass(eq=False)
class Job:
    """One submission. ``done`` is set once ``result`` or ``error`` is."""

    key: int
    done: anyio.Event = field(default_factory=anyio.Event, init=False)
    result: object = field(default=None, init=False)
    error: BaseException | None = field(default=None, init=False)

    def work_item(self) -> WorkItem:
        raise NotImplementedError

    def finish(self, result: object) -> None:
        self.result = result
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@dataclass(eq=False)
class InferenceJob(Job):
    """A step of an inference session: ``plan.batch_size`` rows of ``plan.num_tokens`` tokens.

    Its positions are flattened row by row; the scheduler hands them out in chunks.
    """

    session: Hashable
    step: InferenceStep
    plan: StepPlan
    dtype: str  # activation dtype of the output
    compression: str  # codec of the output
    adapter: str | None = None  # the session's LoRA adapter; None: the plain blocks
    # Compute-thread scratch, set when the first chunk runs:
    hidden: torch.Tensor | None = field(default=None, init=False)  # [B, n, h]
    prompts: torch.Tensor | None = field(default=None, init=False)  # [blocks, B or 1, P, h]
    output: torch.Tensor | None = field(default=None, init=False)  # [B, n, h]

    def work_item(self) -> WorkItem:
        return WorkItem(self.key, WorkKind.INFERENCE, self.plan.total_tokens, self.session)

    def drop_tensors(self) -> None:
        self.hidden = self.prompts = self.output = None


@dataclass(eq=False)
class TrainingJob(Job):
    """A forward or backward request; it runs alone, in one piece."""

    request: ForwardRequest | BackwardRequest
    compression: str
    caller: Hashable = None  # who asked: kept graphs (forward_id) belong to a caller

    @property
    def kind(self) -> WorkKind:
        if isinstance(self.request, ForwardRequest):
            return WorkKind.FORWARD
        return WorkKind.BACKWARD

    def work_item(self) -> WorkItem:
        shape = self.request.hidden.shape
        return WorkItem(self.key, self.kind, shape[0] * shape[1])
