"""Liveness probes of a step's server: a dead one is left at once, a busy one is waited for."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from client_harness import FAST, hf_greedy, swarm_client, tiny_model
from test_client_failover import stall_next_step

from distllm.client.autograd import traced_forward
from distllm.client.events import HopFailed
from distllm.client.generation import SamplingParams, generate_ids
from distllm.client.watchdog import StepWatch, Unresponsive, watched_call
from distllm.config import TransportConfig
from distllm.errors import PeerGone
from distllm.protocol.span_messages import ForwardRequest

pytestmark = pytest.mark.anyio

PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])
#: The transport notices a dead peer only after 5 s: faster detection is the probes' doing.
SLOW_TRANSPORT = TransportConfig(keepalive_interval=1.0, dead_peer_timeout=5.0)
PROBED = dataclasses.replace(FAST, step_timeout=10.0, suspect_after=0.1, probe_timeout=0.2)


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


class Probes:
    def __init__(self, *, fail_at: int | None = None, hang: bool = False) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.hang = hang

    async def __call__(self) -> None:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.calls == self.fail_at:
            raise PeerGone("probe lost")


async def watched(
    call: Any, probes: Probes, *, suspect_after: float | None, probe_timeout: float, who: str
) -> Any:
    """``await call()`` as the step a :class:`StepWatch` watches."""
    watch: StepWatch[str] = StepWatch(
        suspect_after, lambda _: probes(), lambda _: probe_timeout, lambda target: target
    )
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:
        await tg.start(watch.run)
        try:
            with watch.watching(who):
                outcome.append(await call())
        except Exception as exc:
            outcome.append(exc)
        tg.cancel_scope.cancel()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


async def test_a_slow_call_with_a_live_server_completes():
    probes = Probes()

    async def call() -> str:
        await anyio.sleep(0.35)
        return "done"

    result = await watched(call, probes, suspect_after=0.05, probe_timeout=0.1, who="s")
    assert result == "done"
    assert 2 <= probes.calls <= 3  # at 0.05, 0.15, 0.35 s: the interval doubles


async def test_the_watcher_sleeps_between_steps_and_probes_only_slow_ones():
    probes = Probes()
    watch: StepWatch[str] = StepWatch(0.05, lambda _: probes(), lambda _: 0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(watch.run)
        for _ in range(20):  # quick steps: no probe
            with watch.watching("s"):
                await anyio.sleep(0.001)
        await anyio.sleep(0.2)  # idle: no probe either
        assert probes.calls == 0
        with watch.watching("s"):
            await anyio.sleep(0.12)
        assert probes.calls == 1
        with (
            pytest.raises(RuntimeError, match="one step at a time"),
            watch.watching("a"),
            watch.watching("b"),
        ):
            pass
        tg.cancel_scope.cancel()


async def test_a_failed_probe_abandons_the_call():
    probes = Probes(fail_at=2)
    cancelled = anyio.Event()

    async def call() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    began = anyio.current_time()
    with pytest.raises(Unresponsive) as caught:
        await watched(call, probes, suspect_after=0.05, probe_timeout=0.1, who="server s")
    assert anyio.current_time() - began < 0.5
    assert cancelled.is_set()
    assert isinstance(caught.value.__cause__, PeerGone)
    assert "server s" in str(caught.value)


async def test_a_probe_that_hangs_counts_as_failed():
    async def call() -> None:
        await anyio.sleep_forever()

    began = anyio.current_time()
    with pytest.raises(Unresponsive) as caught:
        await watched(call, Probes(hang=True), suspect_after=0.05, probe_timeout=0.1, who="s")
    assert 0.14 <= anyio.current_time() - began < 0.5
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_errors_of_the_call_are_not_wrapped():
    async def call() -> None:
        raise PeerGone("gone")

    with pytest.raises(PeerGone):
        await watched(call, Probes(), suspect_after=0.05, probe_timeout=0.1, who="s")
    with pytest.raises(PeerGone):  # and without a watch
        await watched(call, Probes(), suspect_after=None, probe_timeout=0.1, who="s")


async def test_a_vanished_server_is_replaced_long_before_the_transport_notices(root: Path):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 8)
    async with swarm_client(
        path, [(0, 2), (2, 4), (2, 4)], config=PROBED, transport_config=SLOW_TRANSPORT
    ) as h:
        async with h.model.inference_session(max_length=32) as session:
            victim = session.route[1].peer
            tokens: list[int] = []
            lost_at = 0.0
            async for token in generate_ids(session, PROMPT, 8, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 3:
                    h.black_hole(victim)
                    lost_at = anyio.current_time()
                if len(tokens) == 4:
                    recovered = anyio.current_time() - lost_at
        assert tokens == expected
        (failure,) = [e for e in session.events if isinstance(e, HopFailed)]
        assert failure.hop.peer == victim and isinstance(failure.error, Unresponsive)
        assert recovered < 1.5  # suspicion 0.1 s + probe 0.2 s + failover; transport: 5 s
        await h.assert_clean()


async def test_a_busy_server_is_waited_for(root: Path):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 8)
    async with swarm_client(path, [(0, 2), (2, 4), (2, 4)], config=PROBED) as h:
        async with h.model.inference_session(max_length=32) as session:
            busy = session.route[1].peer
            tokens: list[int] = []
            async for token in generate_ids(session, PROMPT, 8, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 3:
                    stall_next_step(h, busy, 0.8)  # alive, answering probes, but slow
            route = session.route
        assert tokens == expected
        assert not [e for e in session.events if isinstance(e, HopFailed)]
        assert busy in {hop.peer for hop in route}
        await h.assert_clean()


# -- remote forward and backward calls: watched one by one (watched_call) ---------------------


async def test_watched_call_waits_for_a_live_server_and_abandons_a_dead_one():
    probes = Probes()

    async def slow() -> str:
        await anyio.sleep(0.35)
        return "done"

    assert await watched_call(slow, probes, suspect_after=0.05, probe_timeout=0.1, describe="s")
    assert 2 <= probes.calls <= 3  # the interval doubles

    cancelled = anyio.Event()

    async def forever() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    began = anyio.current_time()
    with pytest.raises(Unresponsive, match="server s") as caught:
        await watched_call(
            forever, Probes(fail_at=2), suspect_after=0.05, probe_timeout=0.1, describe="server s"
        )
    assert anyio.current_time() - began < 0.5 and cancelled.is_set()
    assert isinstance(caught.value.__cause__, PeerGone)
    with pytest.raises(Unresponsive) as caught:  # a probe that hangs
        await watched_call(
            forever, Probes(hang=True), suspect_after=0.05, probe_timeout=0.1, describe="s"
        )
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_watched_call_leaves_the_calls_errors_unwrapped():
    async def gone() -> None:
        raise PeerGone("gone")

    for suspect_after in (0.05, None):
        probes = Probes()
        with pytest.raises(PeerGone):
            await watched_call(
                gone, probes, suspect_after=suspect_after, probe_timeout=0.1, describe="s"
            )
        assert probes.calls == 0


async def test_a_forward_to_a_vanished_server_fails_over_long_before_the_transport_notices(
    root: Path,
):
    """The server a forward goes to vanishes while computing it: the probes find it out and the
    forward is redone on the other server of its blocks (the transport would take 5 s)."""
    path = tiny_model("llama", root)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    async with swarm_client(
        path, [(0, 2), (0, 2), (2, 4)], config=PROBED, transport_config=SLOW_TRANSPORT
    ) as h:
        expected, _ = await traced_forward(h.model, x)
        victims: list[Any] = []
        for server in h.swarm.servers[:2]:  # whichever of the two gets the next forward
            compute = server.server.compute

            async def train(
                request: Any,
                *args: Any,
                _run: Any = compute.train,
                _who: Any = server.peer_id,
                **kwargs: Any,
            ) -> Any:
                if not victims and isinstance(request, ForwardRequest):
                    victims.append(_who)
                    h.black_hole(_who)
                    await anyio.sleep_forever()
                return await _run(request, *args, **kwargs)

            compute.train = train  # type: ignore[method-assign]
        began = anyio.current_time()
        output, _ = await traced_forward(h.model, x)
        elapsed = anyio.current_time() - began
        assert torch.equal(output, expected)
        assert h.model.router.bans.failures(victims[0]) == 1
        assert elapsed < 1.5  # suspicion 0.1 s + probe 0.2 s + the forward again
