"""The rules of one inference session, as a sans-IO state machine (pure; both sides use it).

A session has ``batch_size`` rows that advance together. ``position`` counts the tokens every
row has been given so far; a step adds ``n`` tokens per row at positions ``start .. start+n-1``
where ``start`` (``start_from_position``, default ``position``) may be *smaller* than
``position`` -- a rollback: the tokens from ``start`` on are forgotten -- but never larger, and
``start + n`` may not exceed ``max_length``. One step is in flight at a time.

Left padding (batches of prompts of different lengths): ``padding[r]`` leading positions of row
``r`` are pad tokens that the server neither computes nor caches; the row's token at session
position ``q`` is at position ``q - padding[r]`` of its own sequence. A session starts without
padding. A step that starts at position 0 may set it (it replaces the session's padding; replay
after a failover sends it again); any other step must send ``None`` or the session's padding
unchanged (``InvalidPosition`` otherwise). Rows only continue rows of equal padding: with
``hypo_ids``, ``padding[hypo_ids[i]] == padding[i]`` (``InvalidTensor`` otherwise).

Following h11, the side that breaks a rule decides the error: the server *receives* steps
(:meth:`SpanSession.receive_step`: the peer's fault, a
:class:`~distllm.protocol.errors.SpanRequestError`, and the session moves to ``ERROR``), the
client *sends* them (:meth:`SpanSession.send_step`: our fault, ``LocalProtocolError``, nothing
changes) and receives outputs (:meth:`SpanSession.receive_output`: ``RemoteProtocolError``).

States: ``OPEN`` -> ``CLOSED`` (the caller ended the stream) or ``ERROR`` (a rule was broken, or
the step failed); both are final.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from distllm.errors import LocalProtocolError, RemoteProtocolError
from distllm.protocol.errors import InvalidPosition, InvalidTensor, SpanRequestError
from distllm.protocol.span_checks import (
    SpanShape,
    check_hidden,
    check_hypo_ids,
    check_padding,
    check_prompts,
)
from distllm.protocol.span_messages import ACTIVATION_DTYPES, InferenceOutput, InferenceStep

__all__ = ["SessionParams", "SessionState", "SpanSession", "StepPlan"]


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What both sides agreed on when the session opened."""

    max_length: int
    batch_size: int
    dtype: str  # activation dtype of hidden states and prompts
    span: SpanShape

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"dtype must be one of {ACTIVATION_DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A validated step: what the server must compute."""

    step_id: int
    start: int  # position of the first new token (rows roll back to it first)
    num_tokens: int  # new tokens per row
    batch_size: int
    hypo_ids: tuple[int, ...] | None  # row i continues row hypo_ids[i]; None: no reordering
    prompt_length: int  # deep prompts cover positions 0..prompt_length-1; 0: no prompts
    padding: tuple[int, ...] | None = None  # the session's padding once the step runs
    output_tail: int | None = None  # outputs of the last this many tokens per row; None: all

    def row_padding(self, row: int) -> int:
        """Leading pad positions of ``row``."""
        return 0 if self.padding is None else self.padding[row]

    @property
    def end(self) -> int:
        """The session's position once the step is done."""
        return self.start + self.num_tokens

    @property
    def output_tokens(self) -> int:
        """Tokens per row whose outputs come back."""
        tail = self.output_tail
        return self.num_tokens if tail is None else min(tail, self.num_tokens)

    @property
    def total_tokens(self) -> int:
        """Token positions computed, over all rows."""
        return self.batch_size * self.num_tokens


class SpanSession:
    """State of one inference session; see the module docstring for the rules."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.state = SessionState.OPEN
        # Invariant: 0 <= position <= params.max_length.
        self.position = 0
        # Leading pad positions per row; None: none. Changes only with a step from position 0.
        self.padding: tuple[int, ...] | None = None
        # Invariant: set only while OPEN; at most one step in flight.
        self._in_flight: StepPlan | None = None

    @property
    def in_flight(self) -> StepPlan | None:
        """The step sent or received and not yet answered."""
        return self._in_flight

    # -- server side --------------------------------------------------------------------------

    def receive_step(self, step: InferenceStep) -> StepPlan:
        """Validate a step the peer sent. A broken rule raises a ``SpanRequestError`` and moves
        the session to ``ERROR``."""
        self._require_ready("receive a step")
        try:
            plan = self._plan(step)
        except SpanRequestError:
            self.state = SessionState.ERROR
            raise
        self._in_flight = plan
        return plan

    def complete_step(self, plan: StepPlan) -> None:
        """The server computed ``plan``'s outputs: the session moves to ``plan.end``."""
        if self.state is not SessionState.OPEN or plan is not self._in_flight:
            raise LocalProtocolError(f"step {plan.step_id} is not the step in flight")
        self.position = plan.end
        self.padding = plan.padding
        self._in_flight = None

    # -- client side --------------------------------------------------------------------------

    def send_step(self, step: InferenceStep) -> StepPlan:
        """Validate a step before sending it; a broken rule is our bug (``LocalProtocolError``)
        and changes nothing."""
        self._require_ready("send a step")
        try:
            plan = self._plan(step)
        except SpanRequestError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._in_flight = plan
        return plan

    def receive_output(self, output: InferenceOutput) -> None:
        """Check the server's answer to the step in flight and advance the position.

        A wrong answer raises ``RemoteProtocolError`` and moves the session to ``ERROR``.
        """
        if self.state is not SessionState.OPEN:
            raise LocalProtocolError(f"the session is {self.state.value}")
        plan = self._in_flight
        if plan is None:
            problem: str | None = f"output of step {output.step_id} arrived with no step in flight"
        else:
            problem = self._output_problem(output, plan)
        if plan is None or problem is not None:
            self.fail()
            raise RemoteProtocolError(problem or "unexpected output")
        self.position = plan.end
        self.padding = plan.padding
        self._in_flight = None

    def abandon(self) -> StepPlan | None:
        """Give up waiting for the step in flight (a relayed step that may never come, or come
        too late to matter): the position stays where it was, so the next step must say where
        it starts -- a rollback if the server did compute the abandoned one. Returns it."""
        plan = self._in_flight
        self._in_flight = None
        return plan

    # -- either side --------------------------------------------------------------------------

    def fail(self) -> None:
        """The session broke (a failed step, a lost peer): no more steps."""
        if self.state is SessionState.OPEN:
            self.state = SessionState.ERROR
        self._in_flight = None

    def close(self) -> None:
        """The session ended normally (an ``ERROR`` stays ``ERROR``)."""
        if self.state is SessionState.OPEN:
            self.state = SessionState.CLOSED
        self._in_flight = None

    def _require_ready(self, action: str) -> None:
        if self.state is not SessionState.OPEN:
            raise LocalProtocolError(f"cannot {action}: the session is {self.state.value}")
        if self._in_flight is not None:
            raise LocalProtocolError(
                f"cannot {action}: step {self._in_flight.step_id} is still in flight"
            )

    def _plan(self, step: InferenceStep) -> StepPlan:
        params = self.params
        n = check_hidden(
            step.hidden,
            "hidden",
            dtype=params.dtype,
            hidden_size=params.span.hidden_size,
            batch=params.batch_size,
        )
        start = self.position if step.start_from_position is None else step.start_from_position
        if start > self.position:
            raise InvalidPosition(
                f"start_from_position {start} is beyond the session's position {self.position}"
            )
        if start + n > params.max_length:
            raise InvalidPosition(
                f"{n} tokens from position {start} exceed the session's max_length "
                f"{params.max_length}"
            )
        hypo_ids = None
        if step.hypo_ids is not None:
            hypo_ids = check_hypo_ids(step.hypo_ids, params.batch_size)
        prompt_length = 0
        if step.prompts is not None:
            prompt_length = check_prompts(
                step.prompts,
                dtype=params.dtype,
                span=params.span,
                batch=params.batch_size,
                max_length=params.max_length,
            )
        padding = self._padding(step, start)
        if (
            hypo_ids is not None
            and padding is not None
            and any(padding[source] != padding[row] for row, source in enumerate(hypo_ids))
        ):
            raise InvalidTensor("hypo_ids makes a row continue a row of different padding")
        return StepPlan(
            step.step_id,
            start,
            n,
            params.batch_size,
            hypo_ids,
            prompt_length,
            padding,
            step.output_tail,
        )

    def _padding(self, step: InferenceStep, start: int) -> tuple[int, ...] | None:
        """The session's padding once ``step`` (starting at ``start``) runs."""
        if step.padding is None:
            return self.padding
        padding = check_padding(step.padding, self.params.batch_size, self.params.max_length)
        if padding != self.padding and start != 0:
            raise InvalidPosition(
                f"padding may only change on a step from position 0, not from {start}"
            )
        return padding

    def _output_problem(self, output: InferenceOutput, plan: StepPlan) -> str | None:
        if output.step_id != plan.step_id:
            return f"output of step {output.step_id} arrived; step {plan.step_id} is in flight"
        if output.position != plan.end:
            return f"output says position {output.position}; step ends at {plan.end}"
        expected = (plan.batch_size, plan.output_tokens, self.params.span.hidden_size)
        hidden = output.hidden
        if hidden.dtype != self.params.dtype or hidden.shape != expected:
            return (
                f"output is {hidden.dtype}{list(hidden.shape)}; "
                f"expected {self.params.dtype}{list(expected)}"
            )
        return None
