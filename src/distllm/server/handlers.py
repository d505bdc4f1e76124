"""The span RPC handlers: ``span.info``, ``span.inference``, ``span.forward``, ``span.backward``
and ``span.relay``.

Every request is validated before it reaches the compute loop; what breaks a rule gets a typed
error (``WrongSpan``, ``InvalidTensor``, ``InvalidPosition``, ``LimitExceeded``, ``Busy``...,
see ``docs/protocol.md`` §8) and touches nothing else. An inference session lives exactly as
long as its stream handler: whichever way the handler ends -- the caller's end of stream, an
error, an idle timeout, the caller vanishing, the server stopping -- its ``finally`` forgets the
session and releases its pages (synchronously: nothing there can block or be cancelled).

A session takes steps from its caller's stream and from ``span.relay`` streams (steps other
servers relay into it), one at a time in arrival order, through its inbox: a reader task feeds
the caller's messages in, relay handlers the relayed steps. A relayed step is validated like the
caller's own; one whose ``step_id`` is not above the last step the session took is stale and
dropped. After computing a step with relay targets, the session relays the output on
(:mod:`distllm.server.relay`) before answering its caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TypeVar

import anyio

from distllm.errors import Busy, DeadlineExceeded, DistllmError, LimitExceeded, RemoteProtocolError
from distllm.ids import PeerID
from distllm.protocol.errors import UnknownAdapter, UnknownSession, WrongSpan
from distllm.protocol.span_checks import SpanShape, check_backward, check_forward
from distllm.protocol.span_messages import (
    METHOD_BACKWARD,
    METHOD_FORWARD,
    METHOD_INFERENCE,
    METHOD_INFO,
    METHOD_RELAY,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
    RelayOpen,
    SpanInfo,
    SpanInfoRequest,
)
from distllm.protocol.span_session import SessionParams, SpanSession
from distllm.rpc import RpcEndpoint, RpcStream
from distllm.server.compute import ComputeLoop
from distllm.server.config import ServerConfig
from distllm.server.relay import SessionRelay, check_relay, relayed_step
from distllm.server.sessions import Arrival, ServerSession, SessionRegistry
from distllm.wire.tensors import codecs_for

__all__ = ["ServedSpan", "SpanHandlers"]

logger = logging.getLogger("distllm.server")

Opening = TypeVar("Opening", InferenceOpen, RelayOpen)

#: ``retry_after`` suggested to callers of a server that is not serving (any more).
_STOPPED_RETRY_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class ServedSpan:
    """What a server holds."""

    model: str
    start: int
    end: int
    hidden_size: int

    @property
    def shape(self) -> SpanShape:
        return SpanShape(self.end - self.start, self.hidden_size)


class SpanHandlers:
    """Serves one span's RPC methods over an RPC endpoint."""

    def __init__(
        self,
        served: ServedSpan,
        config: ServerConfig,
        compute: ComputeLoop,
        sessions: SessionRegistry,
        info: Callable[[], SpanInfo],
        adapters: Collection[str] = (),
    ) -> None:
        self._served = served
        self._adapters = frozenset(adapters)
        self._config = config
        self._compute = compute
        self._sessions = sessions
        self._info = info
        self._rpc: RpcEndpoint | None = None  # set by register(): relays go out through it
        #: Set when the server stops: every call is then refused with ``Busy``.
        self.stopped = False

    def unregister(self, rpc: RpcEndpoint) -> None:
        for method in (
            METHOD_INFO,
            METHOD_INFERENCE,
            METHOD_FORWARD,
            METHOD_BACKWARD,
            METHOD_RELAY,
        ):
            rpc.remove(method)

    def register(self, rpc: RpcEndpoint) -> None:
        self._rpc = rpc
        rpc.add_unary(METHOD_INFO, self.info, SpanInfoRequest)
        rpc.add_stream(METHOD_INFERENCE, self.inference)
        rpc.add_unary(METHOD_FORWARD, self.forward, ForwardRequest)
        rpc.add_unary(METHOD_BACKWARD, self.backward, BackwardRequest)
        rpc.add_stream(METHOD_RELAY, self.relay)

    # -- unary ---------------------------------------------------------------------------------

    async def info(self, caller: PeerID, request: SpanInfoRequest) -> SpanInfo:
        self._require_serving()
        info = self._info()
        if request.session_id is None:
            return info
        session = self._sessions.find(request.session_id)
        return replace(info, session_step=None if session is None else session.last_step_id)

    async def forward(self, caller: PeerID, request: ForwardRequest) -> ForwardResponse:
        self._require_serving()
        self._check_target(request.model, request.start, request.end)
        self._check_adapter(request.adapter)
        check_forward(request, self._served.shape)
        self._check_request_size(request.hidden.shape)
        compression = self._compression(request.compression, request.hidden.dtype)
        response = await self._compute.train(request, compression, caller)
        if not isinstance(response, ForwardResponse):  # pragma: no cover - compute contract
            raise TypeError(f"forward produced {type(response).__name__}")
        return response

    async def backward(self, caller: PeerID, request: BackwardRequest) -> BackwardResponse:
        self._require_serving()
        self._check_target(request.model, request.start, request.end)
        self._check_adapter(request.adapter)
        check_backward(request, self._served.shape)
        self._check_request_size(request.hidden.shape)
        compression = self._compression(request.compression, request.hidden.dtype)
        response = await self._compute.train(request, compression, caller)
        if not isinstance(response, BackwardResponse):  # pragma: no cover - compute contract
            raise TypeError(f"backward produced {type(response).__name__}")
        return response

    # -- inference sessions --------------------------------------------------------------------

    async def inference(self, stream: RpcStream) -> None:
        """One session: open, steps, and the caller's end of stream closes it."""
        self._require_serving()
        opening = await self._first_message(stream, METHOD_INFERENCE, InferenceOpen)
        if opening is None:
            return
        self._require_serving()
        session = self._admit(opening, stream.remote_peer)
        logger.debug("%r opened: max_length %d", session, opening.max_length)
        try:
            with session.scope:
                await self._serve_session(stream, session, opening)
            if session.scope.cancelled_caught:
                raise Busy("the server is shutting down", _STOPPED_RETRY_AFTER)
        finally:
            # Nothing here awaits: it runs to the end even in a cancelled task.
            session.machine.fail()
            self._sessions.forget(session)
            session.end()
            self._compute.release(session.key)
            logger.debug("%r ended at position %d", session, session.machine.position)

    def _admit(self, opening: InferenceOpen, peer: PeerID) -> ServerSession:
        self._check_target(opening.model, opening.start, opening.end)
        self._check_adapter(opening.adapter)
        config = self._config
        if opening.max_length > config.max_length:
            raise LimitExceeded(
                f"max_length {opening.max_length} exceeds this server's {config.max_length}"
            )
        if opening.batch_size > config.max_batch_size:
            raise LimitExceeded(
                f"batch_size {opening.batch_size} exceeds this server's {config.max_batch_size}"
            )
        params = SessionParams(
            opening.max_length, opening.batch_size, opening.dtype, self._served.shape
        )
        compression = self._compression(opening.compression, opening.dtype)
        return self._sessions.admit(opening.session_id, peer, SpanSession(params), compression)

    async def _serve_session(
        self, stream: RpcStream, session: ServerSession, opening: InferenceOpen
    ) -> None:
        await self._send(
            stream,
            InferenceOpened(
                opening.session_id,
                opening.max_length,
                opening.batch_size,
                self._served.hidden_size,
                self._served.end - self._served.start,
                opening.dtype,
                session.compression,
            ),
        )
        assert self._rpc is not None  # registered before any call can arrive
        # Raised after the task group, which would wrap it in an exception group.
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_caller, stream, session)
            relay = SessionRelay(self._rpc, self._config.relay_timeout, tg, repr(session))
            try:
                await self._serve_steps(stream, session, opening.adapter, relay)
            except Exception as exc:
                failure = exc
            finally:
                relay.close()
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    @staticmethod
    async def _read_caller(stream: RpcStream, session: ServerSession) -> None:
        """Feed the caller's messages, then its end of stream or error, to the session."""
        try:
            while True:
                await session.put(Arrival(await stream.receive()))
        except anyio.EndOfStream:
            await session.put(None)
        except DistllmError as exc:
            await session.put(exc)

    async def _serve_steps(
        self,
        stream: RpcStream,
        session: ServerSession,
        adapter: str | None,
        relay: SessionRelay,
    ) -> None:
        machine, config = session.machine, self._config
        while True:
            arrival = None
            with anyio.move_on_after(config.session_idle_timeout) as idle:
                arrival = await session.take()
            if idle.cancelled_caught:
                raise DeadlineExceeded(
                    f"session idle for {config.session_idle_timeout:g} s: closed"
                )
            if arrival is None:  # the caller's end of stream
                machine.close()
                return
            if isinstance(arrival, DistllmError):
                raise arrival
            message = arrival.message
            if not isinstance(message, InferenceStep):
                raise RemoteProtocolError(
                    f"a session takes InferenceStep messages, not {type(message).__name__}"
                )
            if arrival.relayed and message.step_id <= session.last_step_id:
                logger.debug(
                    "%r: stale relayed step %d dropped (last %d)",
                    session,
                    message.step_id,
                    session.last_step_id,
                )
                continue
            session.last_step_id = message.step_id
            check_relay(message)
            plan = machine.receive_step(message)
            if plan.total_tokens > config.max_step_tokens:
                raise LimitExceeded(
                    f"a step of {plan.batch_size}x{plan.num_tokens} tokens exceeds this "
                    f"server's max_step_tokens {config.max_step_tokens}"
                )
            hidden = await self._compute.infer(
                session.key,
                message,
                plan,
                machine.params.dtype,
                session.compression,
                adapter,
            )
            machine.complete_step(plan)
            output = InferenceOutput(hidden, machine.position, plan.step_id)
            if not message.relay:
                await self._send(stream, output)
                continue
            target, step = message.relay[0], relayed_step(message, plan.start, hidden)
            if relay.answer_first(target):
                # The next server shares our cores and its link is open: our answer, and the
                # caller reading it, would otherwise run while it computes. A relay that fails
                # now is found out by the caller's probes.
                await self._send(stream, replace(output, relayed=True))
                await relay.send(target, step)
            else:  # the next hop's critical path goes first
                relayed = await relay.send(target, step)
                await self._send(stream, replace(output, relayed=relayed))

    # -- relayed steps -------------------------------------------------------------------------

    async def relay(self, stream: RpcStream) -> None:
        """A ``span.relay`` stream: another server's steps for one of our sessions. It ends
        with the session (or when the sender ends it); a step that breaks a rule fails the
        session, as the caller's own would."""
        self._require_serving()
        opening = await self._first_message(stream, METHOD_RELAY, RelayOpen)
        if opening is None:
            return
        self._require_serving()
        session = self._sessions.find(opening.session_id)
        if session is None:
            raise UnknownSession(f"no open session {opening.session_id.hex()} here")
        with anyio.CancelScope() as scope:
            session.add_relay(scope)  # no await since find(): the session is still open
            try:
                async for message in stream:
                    if not isinstance(message, InferenceStep):
                        raise RemoteProtocolError(
                            f"{METHOD_RELAY} takes InferenceStep messages after RelayOpen, "
                            f"not {type(message).__name__}"
                        )
                    if not await session.deliver(message):
                        return
            finally:
                session.remove_relay(scope)

    async def _first_message(
        self, stream: RpcStream, method: str, expected: type[Opening]
    ) -> Opening | None:
        """The message a stream must start with, within the idle timeout; ``None`` if the
        caller ended the stream first."""
        opening: object = None
        with anyio.move_on_after(self._config.session_idle_timeout):
            try:
                opening = await stream.receive()
            except anyio.EndOfStream:
                return None
        if opening is None:
            raise DeadlineExceeded(f"no {expected.__name__} within the idle timeout")
        if not isinstance(opening, expected):
            raise RemoteProtocolError(
                f"{method} starts with {expected.__name__}, not {type(opening).__name__}"
            )
        return opening

    async def _send(self, stream: RpcStream, message: object) -> None:
        with anyio.move_on_after(self._config.step_timeout) as scope:
            await stream.send(message)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"the caller took no output for {self._config.step_timeout:g} s")

    # -- checks --------------------------------------------------------------------------------

    def _require_serving(self) -> None:
        if self.stopped:
            raise Busy("this server is not serving", _STOPPED_RETRY_AFTER)

    def _check_target(self, model: str, start: int, end: int) -> None:
        served = self._served
        if model != served.model or (start, end) != (served.start, served.end):
            raise WrongSpan(
                f"this server holds blocks [{served.start}, {served.end}) of {served.model!r}; "
                f"asked for [{start}, {end}) of {model[:100]!r}"
            )

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._adapters:
            loaded = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapter(f"this server has no adapter {adapter!r} (loaded: {loaded})")

    def _check_request_size(self, shape: tuple[int, ...]) -> None:
        tokens = shape[0] * shape[1]
        if tokens > self._config.max_request_tokens:
            raise LimitExceeded(
                f"{shape[0]}x{shape[1]} tokens exceed this server's max_request_tokens "
                f"{self._config.max_request_tokens}"
            )

    def _compression(self, asked: str | None, dtype: str) -> str:
        """The codec of outputs: the caller's choice, else ours where it fits ``dtype``."""
        if asked is not None:
            return asked
        default = self._config.compression
        return default if default in codecs_for(dtype) else "none"
