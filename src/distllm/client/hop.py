"""One hop of an inference session: a ``span.inference`` stream to one server.

The stream is held open by a task of the session's task group (:meth:`Hop.run`), so hops can be
opened, replaced and closed in any order without nesting their cancel scopes; the session task
itself sends the steps and waits for the outputs (:meth:`Hop.send`, :meth:`Hop.receive`), each
under its own deadline. Closing sends end-of-stream (the server ends the session and frees its
pages); aborting resets the stream (the same, without the goodbye).

A step may also reach the server *relayed* by the previous hop's server (``span.relay``):
:meth:`Hop.expect_relay` books it as sent and names the target for the step that carries it.
If it never comes (or the chain broke before it), :meth:`Hop.drop_relay` forgets it: its id
turns stale -- an output of it, should the server compute it after all, is skipped -- and the
next step, which always names its start position, rolls the server back if needed.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Sequence

import anyio
import anyio.abc

from distllm.client.history import History
from distllm.client.planner import RouteHop
from distllm.errors import DeadlineExceeded, DistllmError, RemoteProtocolError
from distllm.protocol.span_checks import SpanShape
from distllm.protocol.span_messages import (
    METHOD_INFERENCE,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
    RelayTarget,
)
from distllm.protocol.span_session import SessionParams, SpanSession
from distllm.rpc import RpcEndpoint, RpcStream
from distllm.wire.tensors import WireTensor

__all__ = ["Hop", "HopState", "make_step"]

logger = logging.getLogger("distllm.client")


def make_step(
    hidden: WireTensor,
    start: int,
    hypo_ids: WireTensor | None,
    padding: Sequence[int] | None,
    step_id: int,
    prompts: WireTensor | None = None,
    output_tail: int | None = None,
    relay: Sequence[RelayTarget] = (),
) -> InferenceStep:
    return InferenceStep(
        hidden,
        start,
        hypo_ids,
        prompts,
        step_id,
        None if padding is None else tuple(padding),
        output_tail,
        tuple(relay),
    )


class HopState(enum.Enum):
    NEW = "new"  # not opened yet
    OPEN = "open"  # the server holds a session for us
    DONE = "done"  # closed or aborted: the session is gone


class Hop:
    """Blocks ``route.start..route.end`` of one session, computed by ``route.peer``.

    ``history`` holds the inputs this span received so far (what a replacement replays);
    ``None`` until the previous hop's replay produced it. ``needs_replay``: the server has not
    seen ``history`` yet (a replacement).
    """

    def __init__(self, route: RouteHop, history: History | None, *, needs_replay: bool) -> None:
        self.route = route
        self.history = history
        self.needs_replay = needs_replay
        self.state = HopState.NEW
        self._stream: RpcStream | None = None
        self._machine: SpanSession | None = None
        self._scope: anyio.CancelScope | None = None
        self._closing = anyio.Event()
        self._step_ids = itertools.count()
        #: Id of the step booked by :meth:`expect_relay` and not answered yet.
        self.relay_pending: int | None = None
        #: Probes that found the pending relayed step not arrived yet (this step).
        self.relay_misses = 0
        #: Steps relayed here that did not arrive, in a row (the session stops relaying here
        #: after a few: the server before cannot reach this one).
        self.lost_relays = 0
        #: Steps given up on whose outputs may still come: skipped when they do.
        self._stale: set[int] = set()

    def successor(self) -> Hop:
        """A new hop to the same server carrying the same history (after our own failure)."""
        return Hop(self.route, self.history, needs_replay=True)

    async def run(
        self,
        rpc: RpcEndpoint,
        opening: InferenceOpen,
        hidden_size: int,
        connect_timeout: float,
        close_timeout: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open the session (failures raise from ``TaskGroup.start``), then hold it until
        :meth:`close` or :meth:`abort`. Never raises once started."""
        started = False
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + connect_timeout) as scope:
                self._scope = scope
                async with rpc.open_stream(self.route.address, METHOD_INFERENCE) as stream:
                    await stream.send(opening)
                    opened = await stream.receive_as(InferenceOpened)
                    self._machine = SpanSession(self._params(opened, opening, hidden_size))
                    self._stream = stream
                    self.state = HopState.OPEN
                    scope.deadline = math.inf
                    started = True
                    task_status.started()
                    await self._closing.wait()
                    scope.deadline = anyio.current_time() + close_timeout  # bounds the goodbye
            if not started:
                raise DeadlineExceeded(
                    f"opening a session at {self.route.peer!r} took over {connect_timeout:g} s"
                )
        except DistllmError as exc:
            if not started:
                raise
            logger.debug("hop %r ended: %r", self.route, exc)
        finally:
            self.state = HopState.DONE
            self._stream = None

    def _params(
        self, opened: InferenceOpened, opening: InferenceOpen, hidden_size: int
    ) -> SessionParams:
        span = self.route.end - self.route.start
        expected = (opening.session_id, opening.max_length, opening.batch_size, opening.dtype)
        got = (opened.session_id, opened.max_length, opened.batch_size, opened.dtype)
        if got != expected or (opened.hidden_size, opened.num_blocks) != (hidden_size, span):
            raise RemoteProtocolError(
                f"{self.route.peer!r} opened a session unlike the one asked for: {opened!r}"
            )
        return SessionParams(
            opening.max_length, opening.batch_size, opening.dtype, SpanShape(span, hidden_size)
        )

    async def send(
        self,
        hidden: WireTensor,
        start: int,
        hypo_ids: WireTensor | None = None,
        padding: Sequence[int] | None = None,
        prompts: WireTensor | None = None,
        output_tail: int | None = None,
        relay: Sequence[RelayTarget] = (),
    ) -> None:
        """Send one step. The caller bounds it (and :meth:`receive`) with a deadline; if it
        fails or is interrupted, the hop is unusable (abort it). ``prompts``: this span's deep
        prompts ``[span_blocks, b or 1, P, h]``; ``output_tail``: only each row's last
        outputs (see :class:`InferenceStep`); ``relay``: where the server sends its output on
        (the targets' hops booked with :meth:`expect_relay`)."""
        stream, machine = self._open_parts()
        step = make_step(
            hidden, start, hypo_ids, padding, next(self._step_ids), prompts, output_tail, relay
        )
        machine.send_step(step)  # our own rule check: LocalProtocolError is a bug
        await stream.send(step)

    def expect_relay(
        self,
        like: WireTensor,
        start: int,
        hypo_ids: WireTensor | None,
        padding: Sequence[int] | None,
        prompts: WireTensor | None,
        session_id: bytes,
    ) -> RelayTarget:
        """Book the step the previous hop's server will relay here (its input shaped like
        ``like``) as sent; the target that step must name."""
        _, machine = self._open_parts()
        step_id = next(self._step_ids)
        machine.send_step(make_step(like, start, hypo_ids, padding, step_id, prompts))
        self.relay_pending = step_id
        self.relay_misses = 0
        return RelayTarget(str(self.route.address), session_id, step_id, prompts)

    def drop_relay(self) -> None:
        """Stop waiting for the relayed step booked here, if any (see the module doc)."""
        if self.relay_pending is None or self._machine is None:
            return
        self._machine.abandon()
        self._stale.add(self.relay_pending)
        self.relay_pending = None

    async def receive(self) -> tuple[WireTensor, bool | None]:
        """The outputs of the step in flight, and whether the server relayed them on."""
        stream, machine = self._open_parts()
        while True:
            try:
                output = await stream.receive_as(InferenceOutput)
            except anyio.EndOfStream:
                machine.fail()
                raise RemoteProtocolError(
                    f"{self.route.peer!r} ended the session in the middle of a step"
                ) from None
            if output.step_id not in self._stale:
                break
            self._stale.discard(output.step_id)  # a step given up on, computed after all
        machine.receive_output(output)
        self.relay_pending = None
        return output.hidden, output.relayed

    def _open_parts(self) -> tuple[RpcStream, SpanSession]:
        stream, machine = self._stream, self._machine
        if self.state is not HopState.OPEN or stream is None or machine is None:
            raise RemoteProtocolError(f"the session at {self.route.peer!r} is not open")
        return stream, machine

    def close(self) -> None:
        """End the session cleanly (end-of-stream), in the background."""
        self._closing.set()

    def abort(self) -> None:
        """Reset the stream now: the server drops the session."""
        self.state = HopState.DONE
        if self._scope is not None:
            self._scope.cancel()

    def __repr__(self) -> str:
        r = self.route
        return f"Hop([{r.start}, {r.end}) at {r.peer!r}, {self.state.value}, {self.history!r})"
