"""Server-to-server relay (``span.relay``): a step sent to the first server of a route, with
relay targets for the others, gives every server's output on the client's streams exactly as
if the client had sent each hop's step itself -- and every way a relay can fail costs only the
relay (``relayed=False``), never the session."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import torch

from distllm.errors import Busy, RemoteError
from distllm.ids import PeerAddress
from distllm.protocol import (
    METHOD_RELAY,
    InferenceOpen,
    InferenceOutput,
    InferenceStep,
    RelayOpen,
    RelayTarget,
    SessionParams,
    SpanSession,
    SpanShape,
)
from distllm.rpc import RpcEndpoint
from distllm.server.config import ServerConfig
from distllm.server.relay import SessionRelay
from distllm.server.server import Server
from distllm.server.sessions import SessionRegistry
from distllm.server.tensors import to_wire
from distllm.testing import MemoryNetwork, eventually, identity_for, memory_rpc_endpoints
from distllm.wire.tensors import WireTensor

Session = Any  # conftest's Session: an open span.inference stream (.stream, .step)
SpanClient = Any  # conftest's SpanClient

pytestmark = pytest.mark.anyio

HIDDEN = 64
MODEL = "tiny-test-model"  # conftest's tiny checkpoint

#: Three servers, consecutive spans of the tiny 4-block Llama.
SPANS = ((0, 1), (1, 3), (3, 4))
RELAY_TIMEOUT = 0.5
CONFIG = ServerConfig(
    cache_tokens=1024, page_size=4, max_length=256, step_timeout=20.0, relay_timeout=RELAY_TIMEOUT
)
#: Scheduling slack on top of relay_timeout for "answered in time" checks.
SLACK = 1.5
WAIT = 10.0
SID = b"route-session"


def wire(tensor: torch.Tensor | None) -> WireTensor | None:
    if tensor is None:
        return None
    if tensor.dtype == torch.int64:
        return WireTensor.from_numpy(tensor.numpy())
    return to_wire(tensor, "float32", "none")


@dataclass
class Route:
    network: MemoryNetwork
    servers: list[Server]
    server_rpcs: list[RpcEndpoint]
    client: RpcEndpoint
    spare: RpcEndpoint  # an endpoint serving nothing (to partition away)
    make_client: Callable[[RpcEndpoint, PeerAddress], SpanClient]

    def span_client(self, hop: int) -> SpanClient:
        return self.make_client(self.client, self.server_rpcs[hop].address)

    def address(self, hop: int) -> str:
        return str(self.server_rpcs[hop].address)

    def target(self, hop: int, step_id: int, **fields: Any) -> RelayTarget:
        return RelayTarget(self.address(hop), fields.pop("session_id", SID), step_id, **fields)

    @asynccontextmanager
    async def sessions(
        self, session_id: bytes = SID, *, batch_size: int = 1, hops: int = 3, **kwargs: Any
    ) -> AsyncIterator[list[Session]]:
        """Sessions named ``session_id`` on the first ``hops`` servers."""
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(
                    self.span_client(hop).session(
                        batch_size=batch_size,
                        start=SPANS[hop][0],
                        end=SPANS[hop][1],
                        session_id=session_id,
                        **kwargs,
                    )
                )
                for hop in range(hops)
            ]


MakeRoute = Callable[..., Any]


@pytest.fixture
def route(checkpoint: Callable[[str], Path], make_client: Callable[..., SpanClient]) -> MakeRoute:
    """``async with route(**config_overrides) as r``: three servers and a client endpoint."""

    @asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[Route]:
        config = replace(CONFIG, **overrides)
        network = MemoryNetwork()
        async with (
            memory_rpc_endpoints(5, network=network) as endpoints,
            AsyncExitStack() as stack,
        ):
            servers = [
                await stack.enter_async_context(
                    Server(endpoints[hop], checkpoint("llama"), MODEL, start, end, config=config)
                )
                for hop, (start, end) in enumerate(SPANS)
            ]
            yield Route(network, servers, endpoints[:3], endpoints[3], endpoints[4], make_client)

    return run


def step(
    hidden: WireTensor | None,
    step_id: int,
    *,
    start: int | None = None,
    hypo_ids: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
    relay: tuple[RelayTarget, ...] = (),
) -> InferenceStep:
    assert hidden is not None
    return InferenceStep(hidden, start, wire(hypo_ids), wire(prompts), step_id, relay=relay)


async def receive(session: Session) -> InferenceOutput:
    with anyio.fail_after(WAIT):
        return await session.stream.receive_as(InferenceOutput)


async def nothing_arrives(session: Session, within: float = 0.3) -> bool:
    with anyio.move_on_after(within):
        await session.stream.receive()
        return False
    return True


def same(a: InferenceOutput, b: InferenceOutput) -> bool:
    """Bit for bit the same output (the step ids may differ)."""
    return (
        a.position == b.position
        and a.hidden.shape == b.hidden.shape
        and bytes(a.hidden.data) == bytes(b.hidden.data)
    )


def step_id(k: int, hop: int) -> int:
    """Ids increase along the route and from step to step (the client's choice)."""
    return 10 * k + hop


# -- the relay works ---------------------------------------------------------------------------


@pytest.mark.parametrize("colocated", [False, True])
async def test_relayed_steps_equal_direct_ones(
    route: MakeRoute, colocated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across machines a server relays before it answers; to a server on its own machine
    (loopback), once the link is open, it answers first (``SessionRelay.answer_first``)."""
    answered_first: list[bool] = []
    original = SessionRelay.answer_first

    def answer_first(self: SessionRelay, target: RelayTarget) -> bool:
        answered_first.append(original(self, target))
        return answered_first[-1]

    monkeypatch.setattr(SessionRelay, "answer_first", answer_first)
    monkeypatch.setattr("distllm.server.relay.is_loopback", lambda host: colocated)
    rows = 2
    x = torch.randn(rows, 9, HIDDEN)
    # (tokens, start, hypo_ids) per step: prefill, decode, beam reorder, rollback
    plan: list[tuple[torch.Tensor, int | None, torch.Tensor | None]] = [
        (x[:, :5], None, None),
        (x[:, 5:6], None, None),
        (x[:, 6:7], None, torch.tensor([1, 0])),
        (x[:, 7:9], 6, None),
    ]
    # deep prompts for the second and third spans, carried in their relay targets
    prompts = {1: torch.randn(2, 1, 3, HIDDEN) * 0.1, 2: torch.randn(1, rows, 2, HIDDEN) * 0.1}

    async with route() as r:
        direct: list[list[InferenceOutput]] = [[], [], []]
        async with r.sessions(b"direct", batch_size=rows) as sessions:
            for k, (tokens, start, hypo) in enumerate(plan):
                hidden = wire(tokens)
                for hop, session in enumerate(sessions):
                    p = prompts.get(hop) if k == 0 else None
                    await session.stream.send(
                        step(hidden, step_id(k, hop), start=start, hypo_ids=hypo, prompts=p)
                    )
                    out = await receive(session)
                    assert out.relayed is None
                    direct[hop].append(out)
                    hidden = out.hidden

        opened = [r.network.stats(rpc.peer_id).streams_opened for rpc in r.server_rpcs]
        async with r.sessions(batch_size=rows) as sessions:
            for k, (tokens, start, hypo) in enumerate(plan):
                targets = tuple(
                    r.target(hop, step_id(k, hop), prompts=wire(prompts[hop]) if k == 0 else None)
                    for hop in (1, 2)
                )
                await sessions[0].stream.send(
                    step(wire(tokens), step_id(k, 0), start=start, hypo_ids=hypo, relay=targets)
                )
                outputs = [await receive(session) for session in sessions]
                assert [out.relayed for out in outputs] == [True, True, None]
                for hop, out in enumerate(outputs):
                    assert out.step_id == step_id(k, hop)
                    assert same(out, direct[hop][k]), (k, hop)
        # the first relay of each link goes first (the link opens then); later ones as placed
        assert answered_first == [False, False] + [colocated] * 2 * (len(plan) - 1)
        # one span.info check and one span.relay stream per hop, whatever the number of steps
        now = [r.network.stats(rpc.peer_id).streams_opened for rpc in r.server_rpcs]
        assert [b - a for a, b in zip(opened, now, strict=True)] == [2, 2, 0]
        await eventually(lambda: r.network.open_streams() == 0)


async def test_span_info_reports_the_last_step_a_session_received(route: MakeRoute) -> None:
    async with route() as r, r.sessions(hops=2) as (first, second):
        client = r.span_client(1)
        assert (await client.info(SID)).session_step == -1
        assert (await client.info(b"nobody")).session_step is None
        assert (await client.info()).session_step is None
        await first.stream.send(step(wire(torch.randn(1, 4, HIDDEN)), 3, relay=(r.target(1, 7),)))
        assert (await receive(first)).relayed is True
        assert (await receive(second)).step_id == 7
        assert (await client.info(SID)).session_step == 7
        await second.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 2))  # direct: any id
        await receive(second)
        assert (await client.info(SID)).session_step == 2


async def test_a_stale_relayed_step_is_dropped(
    route: MakeRoute, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="distllm.server")
    async with route() as r, r.sessions(hops=2) as (first, second):
        await first.stream.send(step(wire(torch.randn(1, 5, HIDDEN)), 0, relay=(r.target(1, 1),)))
        assert (await receive(first)).relayed is True
        assert (await receive(second)).position == 5
        # the client gave up waiting for a relay and sent step 50 itself
        await second.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 50))
        assert (await receive(second)).position == 6

        for stale_id in (40, 50):  # below and at the last id: both stale
            await first.stream.send(
                step(wire(torch.randn(1, 1, HIDDEN)), stale_id, relay=(r.target(1, stale_id),))
            )
            assert (await receive(first)).relayed is True  # sent; the target drops it
            await eventually(lambda i=stale_id: f"stale relayed step {i} dropped" in caplog.text)
        assert await nothing_arrives(second)
        assert (await r.span_client(1).info(SID)).session_step == 50

        # the session goes on where it was: nothing of the stale steps was computed
        await second.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 51))
        out = await receive(second)
        assert (out.step_id, out.position) == (51, 7)


async def test_failed_relays_answer_relayed_false_in_time(route: MakeRoute) -> None:
    nowhere = PeerAddress(identity_for(99).peer_id, "mem", 1)
    async with route() as r, r.sessions(hops=2) as (first, second):
        # with latency, an UnknownSession error comes back only after the step was sent:
        # the server must find out before it answers
        r.network.set_latency(0.01)
        r.network.partition([r.server_rpcs[0].peer_id], [r.spare.peer_id])
        targets = [
            r.target(1, 1, session_id=b"nobody"),  # no such session there
            RelayTarget(str(nowhere), SID, 1),  # nothing listens there
            RelayTarget(str(r.spare.address), SID, 1),  # black-holed: only the timeout helps
            RelayTarget("distllm://not-an-address", SID, 1),
        ]
        # the client's own fallback keeps the second session in step with the first
        for k, target in enumerate(targets):
            tokens = torch.randn(1, 3 if k == 0 else 1, HIDDEN)
            began = anyio.current_time()
            await first.stream.send(step(wire(tokens), k, relay=(target,)))
            out = await receive(first)
            assert anyio.current_time() - began < RELAY_TIMEOUT + SLACK
            assert out.relayed is False, target
            await second.stream.send(step(out.hidden, k))
            assert (await receive(second)).step_id == k
        # a working target afterwards: relayed again, and both sessions still fine
        k = len(targets)
        await first.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), k, relay=(r.target(1, k),)))
        assert (await receive(first)).relayed is True
        out = await receive(second)
        assert (out.step_id, out.position) == (k, 3 + k)
        await first.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), k + 1))
        assert (await receive(first)).relayed is None


async def test_a_relayed_step_that_breaks_a_rule_fails_only_its_session(
    route: MakeRoute,
) -> None:
    async with (
        route() as r,
        r.sessions(hops=1) as (first,),
        r.span_client(1).session(batch_size=2, start=1, end=3, session_id=SID) as victim,
        r.span_client(1).session(start=1, end=3) as witness,
    ):
        # the victim has two rows; the relayed output has one: InvalidTensor, on its stream
        await first.stream.send(step(wire(torch.randn(1, 3, HIDDEN)), 0, relay=(r.target(1, 1),)))
        assert (await receive(first)).relayed is True
        with pytest.raises(RemoteError) as failure, anyio.fail_after(WAIT):
            await victim.stream.receive()
        assert failure.value.type_name == "InvalidTensor"
        assert (await r.span_client(1).info(SID)).session_step is None  # it ended

        # everybody else goes on: the witness on the same server, the relaying session
        out = await witness.step(torch.randn(1, 4, HIDDEN))
        assert out.shape == (1, 4, HIDDEN)
        # the client opens a replacement under the same id: relaying into it works at once
        # (the link into the failed session died with it; a fresh one is opened)
        async with r.span_client(1).session(start=1, end=3, session_id=SID) as replacement:
            # a replay of the route's history so far (the client kept hop 0's outputs)
            await replacement.stream.send(step(wire(torch.randn(1, 3, HIDDEN)), 3, start=0))
            assert (await receive(replacement)).position == 3
            await first.stream.send(
                step(wire(torch.randn(1, 1, HIDDEN)), 1, relay=(r.target(1, 5),))
            )
            assert (await receive(first)).relayed is True
            out = await receive(replacement)
            assert (out.step_id, out.position) == (5, 4)
        await first.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 2, relay=(r.target(1, 6),)))
        assert (await receive(first)).relayed is False  # no session of that id any more
        await first.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 3))
        assert (await receive(first)).position == 6


async def test_relay_targets_that_cannot_be_built_are_refused(route: MakeRoute) -> None:
    async with route() as r, r.sessions(hops=1) as (first,):
        targets = (r.target(1, 1, output_tail=1), r.target(2, 2))
        await first.stream.send(step(wire(torch.randn(1, 2, HIDDEN)), 0, relay=targets))
        with pytest.raises(RemoteError, match="output_tail"), anyio.fail_after(WAIT):
            await first.stream.receive()


async def test_relay_streams_check_what_they_carry(route: MakeRoute) -> None:
    async with route() as r, r.sessions(hops=1) as (session,):
        server = r.server_rpcs[0].address
        async with r.client.open_stream(server, METHOD_RELAY, timeout=WAIT) as relay:
            await relay.send(RelayOpen(b"nobody"))
            with pytest.raises(RemoteError) as failure:
                await relay.receive()
            assert failure.value.type_name == "UnknownSession"

        # anyone holding the session id may relay into it; junk fails the relay stream only
        async with r.client.open_stream(server, METHOD_RELAY, timeout=WAIT) as relay:
            await relay.send(RelayOpen(SID))
            await relay.send(step(wire(torch.randn(1, 2, HIDDEN)), 5))
            assert (await receive(session)).step_id == 5
            await relay.send(
                InferenceOpen(MODEL, 0, 1, 8, 1, SID, "float32", None)  # not a step
            )
            with pytest.raises(RemoteError, match="InferenceStep"):
                await relay.receive()
        await session.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 6))
        assert (await receive(session)).position == 3


async def test_a_session_ending_ends_its_relay_streams(route: MakeRoute) -> None:
    async with route() as r:
        async with r.sessions(hops=2) as (first, second):
            await first.stream.send(
                step(wire(torch.randn(1, 2, HIDDEN)), 0, relay=(r.target(1, 1),))
            )
            assert (await receive(first)).relayed is True
            await receive(second)
        # both sessions closed: the relay stream between the servers went with them
        await eventually(lambda: r.network.open_streams() == 0)
        assert all(server.info().sessions == 0 for server in r.servers)


# -- server stop -------------------------------------------------------------------------------


async def test_stopping_the_target_server_ends_its_relay_handlers(
    checkpoint: Callable[[str], Path], make_client: Callable[..., SpanClient]
) -> None:
    network = MemoryNetwork()
    async with (
        memory_rpc_endpoints(3, network=network) as (rpc0, rpc1, client),
        Server(rpc0, checkpoint("llama"), MODEL, 0, 1, config=CONFIG),
    ):
        stop = anyio.Event()

        async def second_server(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with Server(rpc1, checkpoint("llama"), MODEL, 1, 4, config=CONFIG):
                task_status.started()
                await stop.wait()

        target = RelayTarget(str(rpc1.address), SID, 1)
        async with (
            anyio.create_task_group() as tg,
            make_client(client, rpc0.address).session(end=1, session_id=SID) as first,
        ):
            await tg.start(second_server)
            async with make_client(client, rpc1.address).session(start=1, session_id=SID) as second:
                await first.stream.send(step(wire(torch.randn(1, 2, HIDDEN)), 0, relay=(target,)))
                assert (await receive(first)).relayed is True
                await receive(second)
                with anyio.fail_after(WAIT):
                    stop.set()
                    with pytest.raises(Busy, match="shutting down"):
                        await second.stream.receive()
            # the stopped server's relay handler ended: the link learns it, and the next relay
            # (which finds the server gone) is answered in time
            began = anyio.current_time()
            await first.stream.send(
                step(wire(torch.randn(1, 1, HIDDEN)), 1, relay=(replace(target, step_id=2),))
            )
            assert (await receive(first)).relayed is False
            assert anyio.current_time() - began < RELAY_TIMEOUT + SLACK
        await eventually(lambda: network.stats(rpc1.peer_id).open_streams == 0)


# -- pieces ------------------------------------------------------------------------------------


def test_relay_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="relay_timeout must be > 0, got 0"):
        ServerConfig(relay_timeout=0)
    assert ServerConfig().relay_timeout == 0.5


async def test_sessions_are_found_by_the_callers_id() -> None:
    registry = SessionRegistry(max_sessions=8, cache_tokens=64, reserve_max_length=False)
    peer = identity_for(0).peer_id

    def machine() -> SpanSession:
        return SpanSession(SessionParams(8, 1, "float32", SpanShape(1, HIDDEN)))

    older = registry.admit(b"a", peer, machine(), "none")
    assert registry.find(b"a") is older and older.last_step_id == -1
    newer = registry.admit(b"a", peer, machine(), "none")
    assert registry.find(b"a") is newer  # the latest opened wins
    registry.forget(older)
    assert registry.find(b"a") is newer  # forgetting another session keeps the mapping
    registry.forget(newer)
    assert registry.find(b"a") is None
    assert registry.find(b"b") is None
    for session in (older, newer):
        session.end()


async def test_a_link_still_opening_is_kept_for_the_next_steps(route: MakeRoute) -> None:
    """A far next server: opening the link (a span.info check, then the stream) takes longer
    than relay_timeout. That step is answered relayed=False, and the link opens on for the
    next ones instead of being torn down and retried every step."""
    async with route(relay_timeout=0.1) as r, r.sessions(hops=2) as (first, second):
        sender = r.server_rpcs[0].peer_id
        r.network.set_latency(0.06, sender, r.server_rpcs[1].peer_id)
        await first.stream.send(step(wire(torch.randn(1, 4, HIDDEN)), 0, relay=(r.target(1, 0),)))
        out = await receive(first)
        assert out.relayed is False  # still opening
        await second.stream.send(step(out.hidden, 0))  # the client sends it itself
        assert (await receive(second)).position == 4
        await anyio.sleep(0.6)  # the link opens meanwhile
        opened = r.network.stats(sender).streams_opened
        await first.stream.send(step(wire(torch.randn(1, 1, HIDDEN)), 1, relay=(r.target(1, 1),)))
        assert (await receive(first)).relayed is True
        relayed = await receive(second)
        assert (relayed.step_id, relayed.position) == (1, 5)
        assert r.network.stats(sender).streams_opened == opened  # the same link
