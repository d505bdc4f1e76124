"""A fault-tolerant inference session through a chain of servers.

Each hop of the route is a ``span.inference`` session at one server (:mod:`.hop`). A step goes
through the hops in order, each under its own ``step_timeout``. When a hop fails (timeout, lost
peer, the server's error):

1. its stream is reset and its peer banned (longer for repeat offenders, at least a ``Busy``
   reply's ``retry_after``);
2. only that hop's blocks are re-planned -- possibly onto several servers -- from the swarm view
   (refreshed from the DHT if nobody is left; waiting for a ban to end within
   ``failover_timeout``);
3. the replacements are opened and sent, as one step from position 0, every input the lost hop
   had received, as the session stands now (rollbacks and row reorders applied: see
   :mod:`.history`) -- the first replacement's outputs are the second one's inputs, and so on;
4. the interrupted step is sent again to the replacements, at the same position; the hops after
   them never notice: they receive only the new tokens, as before.

After ``max_retries`` failovers within one step it gives up with :class:`RouteFailedError`
(or ``NoRouteError`` when no server holds the blocks). A step interrupted by cancellation
leaves the session usable: the hop it was waiting on is reopened and replayed on the next step.

With ``ClientConfig.relay`` a step is sent to the first hop only, naming the open hops after it
as relay targets: each server sends its output straight on to the next one, and answers the
client as well, so the client still records every hop's inputs. The client waits for each
hop's output in turn. When the chain breaks -- a server fails, says it could not relay
(``relayed=False``), or is found by a probe never to have received its step (``StepLost``) --
the hops after the break forget the relayed step (:meth:`Hop.drop_relay`) and get it from the
client instead; every step names its start position, so a server that did compute the dropped
step rolls back and computes it again from the same inputs. Steps that reorder rows go hop by
hop (a reorder cannot be rolled back), and so do compressed activations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
import anyio.abc
import torch

from distllm.client.events import EventCallback, HopFailed, RouteChanged, SessionEvent, SessionStats
from distllm.client.failover import Recovery, plan_replacement
from distllm.client.failures import RouteFailedError, check_adapter, is_hop_failure
from distllm.client.generation import SamplingParams, generate_text
from distllm.client.history import History
from distllm.client.hop import Hop, HopState
from distllm.client.planner import RouteHop
from distllm.client.tensors import TORCH_DTYPES, checked_prompts, from_wire, ids_to_wire, to_wire
from distllm.client.watchdog import StepLost, StepWatch
from distllm.errors import RemoteProtocolError
from distllm.protocol.span_messages import (
    METHOD_INFO,
    InferenceOpen,
    RelayTarget,
    SpanInfo,
    SpanInfoRequest,
)

if TYPE_CHECKING:
    from distllm.client.model import RemoteModel
    from distllm.wire.tensors import WireTensor

__all__ = ["InferenceSession"]

logger = logging.getLogger("distllm.client")

#: Relayed steps to one hop lost in a row before the session stops relaying to it (the server
#: before it cannot reach it): each costs a probe interval or two, or a ``relay_timeout``.
_MAX_LOST_RELAYS = 3


class InferenceSession(AbstractAsyncContextManager["InferenceSession"]):
    """``max_length`` positions of ``batch_size`` rows through every block of ``model``.

    Use as ``async with model.inference_session(max_length=N) as session``; leaving closes
    every server's session (end-of-stream; reset on error or cancellation). With ``adapter``,
    every hop (replacements too) is a server that announces that LoRA adapter and runs its
    blocks with it; a server that answers ``UnknownAdapter`` fails like any other.
    """

    def __init__(
        self,
        model: RemoteModel,
        *,
        max_length: int,
        batch_size: int = 1,
        on_event: EventCallback | None = None,
        adapter: str | None = None,
    ) -> None:
        if not (isinstance(max_length, int) and max_length >= 1):
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        check_adapter(adapter)
        self.model = model
        #: The LoRA adapter every hop runs its blocks with (``None``: the plain blocks).
        self.adapter = adapter
        self.max_length = max_length
        self.batch_size = batch_size
        #: Positions every row has been given so far.
        self.position = 0
        self.events: list[SessionEvent] = []
        self.stats = SessionStats()
        self._on_event = on_event
        self._config = model.client_config
        self._router = model.router
        self._session_id = os.urandom(16)
        self._hops: list[Hop] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._busy = False
        self._closed = False
        #: Left padding per row, set by a step from position 0 and replayed with the history.
        self._padding: tuple[int, ...] | None = None
        #: Deep prompts ``[num_blocks, b or 1, P, h]`` (activation dtype), sent with every step
        #: that covers positions below ``P`` -- replays included.
        self._prompts: torch.Tensor | None = None
        #: Probes a hop's server when a step keeps it waiting (``client/watchdog.py``).
        self._watch: StepWatch[Hop] = StepWatch(
            self._config.suspect_after,
            self._probe,
            self._probe_timeout,
            lambda hop: repr(hop.route.peer),
        )
        self._watch_scope: anyio.CancelScope | None = None  # made on entry (in the event loop)
        #: Server-to-server relay, unless the servers proved unable to relay to each other.
        self._relay = self._config.relay and self._config.compression in (None, "none")
        #: Tokens sampled by ``generate`` and not yet fed through the swarm (continuations).
        self.pending_ids: torch.Tensor | None = None

    @property
    def route(self) -> list[RouteHop]:
        """The servers computing the blocks now, in block order."""
        return [hop.route for hop in self._hops]

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("an InferenceSession can be entered only once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            self._watch_scope = anyio.CancelScope()
            await tg.start(self._run_watch, self._watch_scope)
            route = await self._router.plan_session(
                0,
                self.model.num_blocks,
                cache_tokens=self._cache_tokens,
                deadline=self._deadline(),
                adapter=self.adapter,
            )
            self._hops = [Hop(r, History(), needs_replay=False) for r in route]
            await self._open_all()
        except BaseException:
            await self._shutdown(failed=True)
            raise
        self._emit(RouteChanged("opened", 0, tuple(self.route)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown(failed=exc is not None)

    async def _run_watch(
        self,
        scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await self._watch.run(task_status=task_status)

    async def _shutdown(self, *, failed: bool) -> None:
        """Close every hop: end-of-stream after a normal exit, a reset after an error."""
        self._closed = True
        if self._watch_scope is not None:
            self._watch_scope.cancel()
        tg = self._tg
        assert tg is not None
        for hop in self._hops:
            hop.close()  # each hop's task says goodbye within close_timeout
        if failed:
            tg.cancel_scope.cancel()
        # The caller's exception is not passed in: under trio it would come out wrapped in an
        # ExceptionGroup. The hop tasks raise nothing once started.
        await tg.__aexit__(None, None, None)

    @property
    def _cache_tokens(self) -> int:
        return self.max_length * self.batch_size

    def _deadline(self) -> float:
        return anyio.current_time() + self._config.failover_timeout

    # -- steps ---------------------------------------------------------------------------------

    async def step(
        self,
        hidden: torch.Tensor,
        *,
        start_from_position: int | None = None,
        hypo_ids: torch.Tensor | None = None,
        padding: Sequence[int] | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` ``[batch_size, n, hidden_size]`` (the first block's inputs for ``n``
        new tokens per row) through every block; returns the last block's outputs, same shape.

        ``start_from_position`` (default: ``position``) rolls the session back first: the new
        tokens take positions ``start .. start+n-1`` and what came after is forgotten.
        ``hypo_ids`` (``[batch_size]`` ints) reorders the rows first: row ``i`` continues row
        ``hypo_ids[i]`` (beam search; only rows of equal padding). ``padding``: leading pad
        positions per row (prompts of different lengths), set by a step from position 0; later
        steps pass ``None`` or the same (``protocol/span_session.py``).
        ``prompts`` (deep prompt tuning) ``[num_blocks, batch_size or 1, P, hidden_size]``:
        before block ``i``, ``prompts[i]`` is added at each row's first ``P`` positions (of its
        own sequence, after its padding). The session keeps them and sends each hop its slice
        with every step that reaches below position ``P``, replays included; new ones replace
        them. Per-row prompts follow their rows through ``hypo_ids`` reorders.
        """
        start, hypo = self._check_step(hidden, start_from_position, hypo_ids, padding)
        if prompts is not None:
            self._prompts = self._checked_prompts(prompts)
        elif hypo is not None and self._prompts is not None and self._prompts.shape[1] > 1:
            # Row i now continues row hypo[i]: so do its deep prompts (in this step, replays
            # and rollbacks below P alike).
            self._prompts = self._prompts[:, hypo].contiguous()
        if self._busy:
            raise RuntimeError("another step of this session is running: one at a time")
        self._busy = True
        try:
            output = await self._step(hidden, start, hypo, padding)
        finally:
            self._busy = False
        self.position = start + hidden.shape[1]
        if padding is not None:
            self._padding = tuple(padding)
        self.stats.steps += 1
        self.stats.tokens += hidden.shape[1]
        return output.to(hidden.dtype)

    def _checked_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        return checked_prompts(
            prompts,
            num_blocks=self.model.num_blocks,
            batch=self.batch_size,
            max_length=self.max_length,
            hidden_size=self.model.hidden_size,
            dtype=TORCH_DTYPES[self._config.activation_dtype],
        )

    def _hop_prompts(self, hop: Hop, start: int) -> WireTensor | None:
        """Hop's slice of the deep prompts, if a step from ``start`` reaches them."""
        prompts = self._prompts
        if prompts is None or start >= prompts.shape[2]:
            return None
        part = prompts[hop.route.start : hop.route.end].contiguous()
        return to_wire(part, self._config.activation_dtype)

    def _check_step(
        self,
        hidden: torch.Tensor,
        start_from_position: int | None,
        hypo_ids: torch.Tensor | None,
        padding: Sequence[int] | None,
    ) -> tuple[int, torch.Tensor | None]:
        if self._tg is None or self._closed:
            raise RuntimeError("the session is not open (use it as an async context manager)")
        expected = (self.batch_size, self.model.hidden_size)
        if (
            hidden.dim() != 3
            or (hidden.shape[0], hidden.shape[2]) != expected
            or not hidden.shape[1]
        ):
            raise ValueError(
                f"hidden must be [{self.batch_size}, n >= 1, {self.model.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        start = self.position if start_from_position is None else start_from_position
        if not (isinstance(start, int) and 0 <= start <= self.position):
            raise ValueError(
                f"start_from_position must be an int in 0..{self.position}, got {start!r}"
            )
        if start + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"{hidden.shape[1]} tokens from position {start} exceed max_length "
                f"{self.max_length}"
            )
        hypo = None
        if hypo_ids is not None:
            hypo = torch.as_tensor(hypo_ids).to(torch.int64).reshape(-1)
            if hypo.shape[0] != self.batch_size or not all(
                0 <= i < self.batch_size for i in hypo.tolist()
            ):
                raise ValueError(
                    f"hypo_ids must be {self.batch_size} row indices in 0..{self.batch_size - 1},"
                    f" got {hypo.tolist()}"
                )
        if padding is not None:
            if len(padding) != self.batch_size or any(
                not 0 <= p < self.max_length for p in padding
            ):
                raise ValueError(
                    f"padding must give {self.batch_size} counts in 0..{self.max_length - 1}, "
                    f"got {list(padding)}"
                )
            if start != 0 and tuple(padding) != (self._padding or (0,) * self.batch_size):
                raise ValueError("padding may only change on a step from position 0")
        return start, hypo

    async def _step(
        self,
        hidden: torch.Tensor,
        start: int,
        hypo: torch.Tensor | None,
        padding: Sequence[int] | None,
    ) -> torch.Tensor:
        config = self._config
        dtype = config.activation_dtype
        # A copy: the history keeps it, and the caller may reuse its buffer.
        x = hidden.detach().to(TORCH_DTYPES[dtype], copy=True).contiguous()
        hypo_wire = ids_to_wire(hypo) if hypo is not None else None
        # Hops that took this step, by first block: their history before it, and their input
        # (a failover that must re-route them too starts over from there).
        done: dict[int, tuple[History, torch.Tensor]] = {}
        relay = self._relay and hypo is None
        with anyio.CancelScope() as scope:
            recovery = Recovery(scope, config.failover_timeout, self.model.name)
            i = 0
            while i < len(self._hops):
                wire = to_wire(x, dtype, config.compression or "none")
                if config.compression not in (None, "none"):
                    x = from_wire(wire)  # what the server sees, hence what a replay must send
                try:
                    hop = await self._ready(i)
                    came_relayed = hop.relay_pending is not None
                    with anyio.fail_after(config.step_timeout), self._watch.watching(hop):
                        if not came_relayed:  # not on its way from the previous hop: send it
                            targets = self._relay_targets(i, wire, start, padding) if relay else []
                            prompts = self._hop_prompts(hop, start)
                            await hop.send(wire, start, hypo_wire, padding, prompts, relay=targets)
                        out, relayed = await hop.receive()
                except StepLost as exc:  # alive, but its relayed step never came: send it
                    logger.debug("relayed step lost at hop %d: %s", i, exc)
                    self._drop_relays(i)
                    self._lost_relay(self._hops[i])
                    continue
                except Exception as exc:
                    self._drop_relays(i + 1)  # the chain broke here
                    if not is_hop_failure(exc):
                        self._reset(i, exc)
                        self._undo_reorders(hypo, done)
                        raise
                    first = await self._fail_over(i, exc, recovery, done)
                    if first < i:  # re-routed hops that had taken this step: redo them
                        i, x = first, done[self._hops[first].route.start][1]
                    continue
                except BaseException as exc:  # cancelled: the hop's stream is in an unknown state
                    self._drop_relays(i + 1)
                    self._reset(i, exc)
                    self._undo_reorders(hypo, done)
                    raise
                self.stats.relayed_steps += came_relayed
                if came_relayed:
                    hop.lost_relays = 0
                if relayed is False and i + 1 < len(self._hops):  # never got it from this one
                    self._drop_relays(i + 1)
                    self._lost_relay(self._hops[i + 1])
                self._router.on_success(hop.route.peer)
                assert hop.history is not None  # set before its replay
                done[hop.route.start] = (hop.history.copy(), x)
                hop.history.record(start, hypo, x)
                x = from_wire(out)
                i += 1
        recovery.check()
        if recovery.began is not None:
            self.stats.recovery_seconds.append(anyio.current_time() - recovery.began)
        return x

    def _probe_timeout(self, hop: Hop) -> float:
        return max(self._config.probe_timeout, 4 * self._router.view.rtt(hop.route.peer))

    async def _probe(self, hop: Hop) -> None:
        """One liveness probe of ``hop``'s server (see :mod:`distllm.client.watchdog`); for a
        hop waiting for a relayed step, also whether that step arrived."""
        pending = hop.relay_pending
        info = await self.model.rpc.call(
            hop.route.address,
            METHOD_INFO,
            SpanInfoRequest(None if pending is None else self._session_id),
            timeout=self._probe_timeout(hop),
            response_type=SpanInfo,
        )
        if pending is None or hop.relay_pending != pending:
            return
        if info.session_step is None:
            raise RemoteProtocolError(f"{hop.route.peer!r} no longer holds our session")
        if info.session_step < pending:
            # Twice, so that a relay slower than a probe is not taken for a lost one.
            hop.relay_misses += 1
            if hop.relay_misses >= 2:
                raise StepLost(f"{hop.route.peer!r} never got step {pending} relayed to it")

    def _relay_targets(
        self, i: int, like: WireTensor, start: int, padding: Sequence[int] | None
    ) -> list[RelayTarget]:
        """Book the step as relayed to the open hops after hop ``i`` (up to the first one that
        must first be opened or replayed); their targets, in order."""
        targets = []
        for hop in self._hops[i + 1 :]:
            if (
                hop.state is not HopState.OPEN
                or hop.needs_replay
                or hop.history is None
                or hop.lost_relays >= _MAX_LOST_RELAYS  # the server before it cannot reach it
            ):
                break
            prompts = self._hop_prompts(hop, start)
            targets.append(hop.expect_relay(like, start, None, padding, prompts, self._session_id))
        return targets

    def _drop_relays(self, first: int) -> None:
        """Hops from ``first`` on stop waiting for relayed steps (the chain broke before)."""
        for hop in self._hops[first:]:
            hop.drop_relay()

    def _lost_relay(self, hop: Hop) -> None:
        """A step relayed to ``hop`` did not arrive."""
        self.stats.lost_relays += 1
        hop.lost_relays += 1
        if hop.lost_relays == _MAX_LOST_RELAYS:
            logger.warning(
                "%d steps relayed to %r in a row were lost: the session sends it its steps"
                " itself from now on",
                hop.lost_relays,
                hop.route.peer,
            )

    async def _ready(self, i: int) -> Hop:
        """Hop ``i``, opened and replayed (a replacement) -- or the failure that prevents it."""
        hop = self._hops[i]
        if hop.state is HopState.DONE:  # reset after our own interruption: same server again
            hop = self._hops[i] = hop.successor()
        if hop.state is HopState.NEW:
            await self._open(hop)
        if hop.needs_replay:
            await self._replay(i)
        return hop

    async def _open(self, hop: Hop) -> None:
        assert self._tg is not None
        config, model = self._config, self.model
        opening = InferenceOpen(
            model=model.name,
            start=hop.route.start,
            end=hop.route.end,
            max_length=self.max_length,
            batch_size=self.batch_size,
            session_id=self._session_id,
            dtype=config.activation_dtype,
            compression=config.compression,
            adapter=self.adapter,
        )
        await self._tg.start(
            hop.run,
            model.rpc,
            opening,
            model.hidden_size,
            config.connect_timeout,
            config.close_timeout,
        )

    async def _open_all(self) -> None:
        """Open every new hop concurrently; replace those that fail (at position 0)."""
        with anyio.CancelScope() as scope:
            recovery = Recovery(scope, self._config.failover_timeout, self.model.name)
            while True:
                errors: dict[Hop, Exception] = {}
                async with anyio.create_task_group() as tg:
                    for hop in self._hops:
                        if hop.state is HopState.NEW:
                            tg.start_soon(self._try_open, hop, errors)
                if not errors:
                    break
                for hop, error in errors.items():
                    if hop in self._hops:  # not re-routed along with another one yet
                        await self._fail_over(self._hops.index(hop), error, recovery, {})
        recovery.check()

    async def _try_open(self, hop: Hop, errors: dict[Hop, Exception]) -> None:
        try:
            await self._open(hop)
        except Exception as exc:
            if not is_hop_failure(exc):
                raise
            errors[hop] = exc

    async def _replay(self, i: int) -> None:
        """Rebuild a replacement's cache: its history as one step from position 0. Its outputs
        are the history of the next hop when that one is a replacement too."""
        hop = self._hops[i]
        history = hop.history
        assert history is not None  # the previous hop's replay produced it
        following = self._hops[i + 1] if i + 1 < len(self._hops) else None
        if history.length:
            # Its outputs matter only to a next hop that must replay them too.
            wanted = following is not None and following.history is None
            config = self._config
            with anyio.fail_after(config.step_timeout), self._watch.watching(hop):
                await hop.send(
                    to_wire(history.tensor(), config.activation_dtype),  # raw: exact
                    0,
                    None,
                    self._padding,
                    self._hop_prompts(hop, 0),
                    None if wanted else 0,
                )
                out, _ = await hop.receive()
            self.stats.replayed_tokens += history.length
            if following is not None and following.history is None:
                following.history = History([from_wire(out)])
        elif following is not None and following.history is None:
            following.history = History()
        hop.needs_replay = False

    async def _fail_over(
        self,
        i: int,
        error: Exception,
        recovery: Recovery,
        done: dict[int, tuple[History, torch.Tensor]],
    ) -> int:
        """Replace hop ``i`` after ``error`` -- with its neighbours when its blocks cannot be
        re-routed alone -- or raise. Returns the index of the first new hop."""
        hop = self._hops[i]
        hop.abort()
        banned_for = self._router.ban(hop.route.peer, error)
        self._emit(HopFailed(self.position, i, hop.route, error, banned_for))
        recovery.failed(hop.route, error)
        if recovery.failures > self._config.max_retries:
            raise RouteFailedError(self.model.name, hop.route, recovery.failures, error) from error
        first, last, route = await plan_replacement(
            self._router,
            self.route,
            i,
            error,
            cache_tokens=self._cache_tokens,
            deadline=recovery.scope.deadline,
            adapter=self.adapter,
        )
        start = self._hops[first].route.start
        # The state the new first hop must rebuild: as it was before this step.
        history = done[start][0] if start in done else self._hops[first].history
        for old in self._hops[first : last + 1]:
            old.close()  # healthy neighbours re-routed with it: a clean goodbye
        self._hops[first : last + 1] = [
            Hop(r, history if k == 0 else None, needs_replay=True) for k, r in enumerate(route)
        ]
        self.stats.failovers += 1
        self._emit(RouteChanged("failover", self.position, tuple(self.route)))
        return first

    def _undo_reorders(
        self, hypo: torch.Tensor | None, done: dict[int, tuple[History, torch.Tensor]]
    ) -> None:
        """A step that reordered rows was interrupted: the hops that took it cannot be rolled
        back by the next step (a rollback forgets positions, not a reorder), so they are
        reopened on the same servers and rebuilt from their history before it."""
        if hypo is None:
            return
        for k, hop in enumerate(self._hops):
            if hop.route.start in done and hop.state is not HopState.DONE:
                hop.abort()
                self._hops[k] = Hop(hop.route, done[hop.route.start][0], needs_replay=True)

    def _reset(self, i: int, error: BaseException) -> None:
        """Hop ``i`` was interrupted by us (not its server's fault): reopen it next step."""
        if i < len(self._hops) and self._hops[i].state is HopState.OPEN:
            hop = self._hops[i]
            hop.abort()
            self._emit(HopFailed(self.position, i, hop.route, error, 0.0))

    def _emit(self, event: SessionEvent) -> None:
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> AsyncIterator[str]:
        """Stream the text of up to ``max_new_tokens`` new tokens after ``prompt`` (text, or
        token ids ``[1, T]``), continuing the session (see :mod:`distllm.client.generation`)."""
        params = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        return generate_text(self, prompt, max_new_tokens, params, stop_at_eos=stop_at_eos)

    def __repr__(self) -> str:
        hops = ", ".join(f"[{r.start},{r.end})@{r.peer.short}" for r in self.route)
        return f"InferenceSession({self.model.name!r}, position={self.position}, route={hops})"
