"""Failover: a lost server is replaced, its inputs replayed, and the session goes on unchanged."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from client_harness import FAST, Harness, hf_greedy, swarm_client, tiny_model

from distllm.client import NoRouteError, RouteFailedError
from distllm.client.events import HopFailed, RouteChanged
from distllm.client.generation import SamplingParams, generate_ids
from distllm.errors import Busy, DistllmError

pytestmark = pytest.mark.anyio

PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])
#: A short step deadline, for tests that wait for it to pass.
QUICK = dataclasses.replace(FAST, step_timeout=0.5)


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


def fail_next_step(h: Harness, peer: object, error: Callable[[], BaseException]) -> None:
    """The server ``peer`` fails its next inference step with ``error()`` (server side)."""
    compute = h.swarm.servers[h.server_index(peer)].server.compute
    original = compute.infer

    async def infer(*args: Any, **kwargs: Any) -> Any:
        compute.infer = original  # type: ignore[method-assign]
        raise error()

    compute.infer = infer  # type: ignore[method-assign]


def stall_next_step(h: Harness, peer: object, seconds: float) -> None:
    """The server ``peer`` hangs ``seconds`` over its next step, then goes on."""
    compute = h.swarm.servers[h.server_index(peer)].server.compute
    original = compute.infer

    async def infer(*args: Any, **kwargs: Any) -> Any:
        compute.infer = original  # type: ignore[method-assign]
        await anyio.sleep(seconds)
        return await original(*args, **kwargs)

    compute.infer = infer  # type: ignore[method-assign]


async def test_kill_mid_generation_with_standby_gives_identical_tokens(root: Path):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 10)
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        async with h.model.inference_session(max_length=32) as session:
            victim = session.route[1].peer
            await h.swarm.add_server(2, 4)  # the standby
            await h.model.refresh()
            tokens = []
            async for token in generate_ids(session, PROMPT, 10, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 4:
                    h.black_hole(victim)
            route = session.route
        assert tokens == expected
        assert victim not in {hop.peer for hop in route}
        failed = [e for e in session.events if isinstance(e, HopFailed)]
        assert [(e.index, e.hop.peer, e.position) for e in failed] == [(1, victim, 9)]
        assert session.events[-1] == RouteChanged("failover", 9, tuple(route))
        assert session.stats.failovers == 1
        assert session.stats.replayed_tokens == 9  # 6 prompt + 3 fed tokens
        await h.assert_clean()


@pytest.mark.parametrize("how", ["busy", "stall", "partition"])
async def test_server_side_failures_fail_over(root: Path, how: str):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 8)
    async with swarm_client(path, [(0, 2), (0, 2), (2, 4)], config=QUICK) as h:
        async with h.model.inference_session(max_length=32) as session:
            victim = session.route[0].peer
            tokens = []
            async for token in generate_ids(session, PROMPT, 8, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 3:
                    if how == "busy":
                        fail_next_step(h, victim, lambda: Busy("full", retry_after=5.0))
                    elif how == "stall":  # beyond the client's step_timeout
                        stall_next_step(h, victim, 2 * QUICK.step_timeout)
                    else:
                        h.swarm.network.partition([h.client.peer_id], [victim])
        h.swarm.network.heal()
        assert tokens == expected
        (failure,) = [e for e in session.events if isinstance(e, HopFailed)]
        assert failure.hop.peer == victim
        if how == "busy":  # the server's retry_after is honoured
            assert isinstance(failure.error, Busy) and failure.banned_for == 5.0
        await h.assert_clean()


async def test_replacement_may_take_several_servers(root: Path):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 8)
    async with swarm_client(path, [(0, 4), (0, 1), (1, 3), (3, 4)]) as h:
        async with h.model.inference_session(max_length=32) as session:
            assert [(r.start, r.end) for r in session.route] == [(0, 4)]  # fewest hops
            whole = session.route[0].peer
            tokens = []
            async for token in generate_ids(session, PROMPT, 8, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 5:
                    h.black_hole(whole)
            route = session.route
        assert tokens == expected
        assert [(r.start, r.end) for r in route] == [(0, 1), (1, 3), (3, 4)]
        await h.assert_clean()


async def test_rollback_and_reorder_are_replayed_exactly(root: Path):
    """After rollbacks and hypo_ids reorders, a replacement rebuilds exactly the current cache:
    the outputs equal those of a twin session that never failed."""
    path = tiny_model("llama", root)
    torch.manual_seed(0)
    hidden = torch.randn(3, 12, 64)
    steps: list[dict[str, Any]] = [
        {"x": hidden[:, :5]},
        {"x": hidden[:, 5:6]},
        {"x": hidden[:, 6:8], "hypo_ids": torch.tensor([2, 0, 0])},
        {"x": hidden[:, 8:9], "start_from_position": 4},  # rollback
        {"x": hidden[:, 9:10], "hypo_ids": torch.tensor([1, 1, 2])},
        {"x": hidden[:, 10:12]},  # <- the server dies before this step
        {"x": hidden[:, 2:3], "start_from_position": 3, "hypo_ids": torch.tensor([0, 2, 1])},
    ]
    async with swarm_client(path, [(0, 2), (2, 4), (2, 4)]) as h:
        expected = []
        async with h.model.inference_session(max_length=16, batch_size=3) as twin:
            for step in steps:
                kwargs = {key: v for key, v in step.items() if key != "x"}
                expected.append(await twin.step(step["x"], **kwargs))
        async with h.model.inference_session(max_length=16, batch_size=3) as session:
            for k, step in enumerate(steps):
                if k == 5:
                    h.black_hole(session.route[1].peer)
                kwargs = {key: v for key, v in step.items() if key != "x"}
                got = await session.step(step["x"], **kwargs)
                # Equal up to float32 rounding: the replacement computed the cache in one prefill
                # where the lost server had computed it step by step (GEMM results depend on
                # the number of rows on CPUs, so the last bits may differ).
                torch.testing.assert_close(got, expected[k], atol=1e-5, rtol=1e-4)
            assert session.stats.failovers == 1
            assert session.stats.replayed_tokens == 6  # 4 kept by the rollback, then 1 + 1
        await h.assert_clean()


async def test_no_replacement_is_a_clear_error_in_bounded_time(root: Path):
    path = tiny_model("llama", root)
    config = dataclasses.replace(FAST, failover_timeout=1.0)
    async with swarm_client(path, [(0, 2), (2, 4)], config=config) as h:
        async with h.model.inference_session(max_length=32) as session:
            hidden = h.model.parts.embed(PROMPT)
            await session.step(hidden)
            victim = h.swarm.servers[1].peer_id
            h.black_hole(victim)
            began = anyio.current_time()
            with pytest.raises((NoRouteError, RouteFailedError)) as caught:
                await session.step(hidden[:, :1])
            elapsed = anyio.current_time() - began
        # The loss is noticed within dead_peer_timeout (0.5 s); then the only holder of the
        # blocks is retried as its bans end, until failover_timeout (1 s) runs out.
        assert elapsed < 0.5 + config.failover_timeout + 0.5
        text = str(caught.value)
        assert "blocks [2, 4) of model 'llama'" in text or "blocks 2, 3 of model 'llama'" in text
        assert isinstance(caught.value.__cause__, DistllmError)
        await h.assert_clean()


async def test_no_server_at_all_is_a_no_route_error(root: Path):
    path = tiny_model("llama", root)
    async with swarm_client(path, [(0, 2)]) as h:
        with pytest.raises(NoRouteError, match=r"no server holds blocks 2, 3 of model 'llama'"):
            async with h.model.inference_session(max_length=8):
                pass
        await h.assert_clean()


async def test_blocks_that_cannot_be_rerouted_alone_take_their_neighbours_along(root: Path):
    """Servers serve whole spans: when no span fits a lost hop's blocks, the smallest stretch
    of hops around it that can be re-routed is -- to the right, or to the left (the hops there
    already took the step: it is redone from their inputs)."""
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 10)
    spans = [(0, 2), (2, 3), (3, 4), (2, 4), (0, 4)]
    async with swarm_client(path, spans) as h:
        a, b, c, d, e = (s.peer_id for s in h.swarm.servers)
        view = h.model.router.view
        for peer, rtt in ((a, 0.0), (b, 0.0), (c, 0.0), (d, 0.04), (e, 0.2)):
            view.set_rtt(peer, rtt)  # through d or e costs more: a, b, c is the first choice
        async with h.model.inference_session(max_length=32) as session:
            assert [r.peer for r in session.route] == [a, b, c]
            tokens = []
            async for token in generate_ids(session, PROMPT, 10, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 3:
                    h.swarm.stop(h.server_index(b))  # [2, 3) alone: only [2, 4) fits -> b, c
                if len(tokens) == 6:
                    assert [r.peer for r in session.route] == [a, d]
                    h.swarm.stop(h.server_index(d))  # [2, 4): only [0, 4) fits -> a, d
            assert [r.peer for r in session.route] == [e]
        assert tokens == expected
        assert session.stats.failovers == 2
        await h.assert_clean()


async def test_a_cancelled_step_leaves_the_session_usable(root: Path):
    path = tiny_model("llama", root)
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        hidden = h.model.parts.embed(PROMPT)
        async with h.model.inference_session(max_length=16) as twin:
            expected = [await twin.step(hidden[:, :4]), await twin.step(hidden[:, 4:])]
        async with h.model.inference_session(max_length=16) as session:
            first = await session.step(hidden[:, :4])
            stall_next_step(h, session.route[1].peer, 1.0)
            with anyio.move_on_after(0.2) as scope:  # our own deadline, not the server's fault
                await session.step(hidden[:, 4:])
            assert scope.cancelled_caught and session.position == 4
            # Hop 0 took the cancelled step, hop 1 was waiting for it: the retry rolls hop 0
            # back to position 4 and reopens hop 1 (same server: it did nothing wrong).
            second = await session.step(hidden[:, 4:])
            assert [e.banned_for for e in session.events if isinstance(e, HopFailed)] == [0.0]
            assert not h.model.router.banned()
        torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(second, expected[1], atol=1e-5, rtol=1e-4)
        await h.assert_clean()


async def test_deep_prompts_are_replayed_to_a_replacement(root: Path):
    path = tiny_model("llama", root)
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randn(4, 1, 3, 64, generator=generator) * 0.5  # [blocks, 1, P=3, h]
    x = torch.randn(1, 6, 64, generator=generator)
    steps = [torch.randn(1, 1, 64, generator=generator) for _ in range(3)]
    async with swarm_client(path, [(0, 2), (2, 4), (2, 4)]) as h:
        # The reference: the same steps, no failure.
        async with h.model.inference_session(max_length=16) as session:
            expected = [await session.step(x, prompts=prompts)]
            expected += [await session.step(s) for s in steps]
        async with h.model.inference_session(max_length=16) as session:
            with pytest.raises(ValueError, match="prompts must be"):  # 3 blocks, not 4
                await session.step(x, prompts=prompts[:3])
            bad = prompts.clone()
            bad[0, 0, 0, 0] = float("nan")
            with pytest.raises(ValueError, match="prompts holds NaN"):
                await session.step(x, prompts=bad)
            got = [await session.step(x, prompts=prompts)]
            got.append(await session.step(steps[0]))
            victim = session.route[1].peer
            h.black_hole(victim)
            got += [await session.step(s) for s in steps[1:]]
            assert victim not in {hop.peer for hop in session.route}
            assert session.stats.replayed_tokens == 7
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        # Without the prompts the outputs differ: the replay did carry them.
        async with h.model.inference_session(max_length=16) as session:
            plain = await session.step(x)
        assert not torch.allclose(plain, expected[0], atol=1e-3)
        await h.assert_clean()


async def test_per_row_deep_prompts_follow_row_reorders_into_a_replay(root: Path):
    """Rows reordered by ``hypo_ids`` take their deep prompts along: a replacement rebuilding
    the cache after the reorder gets each row's own prompts."""
    path = tiny_model("llama", root)
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randn(4, 2, 2, 64, generator=generator)  # [blocks, b=2, P=2, h]: per row
    x = torch.randn(2, 4, 64, generator=generator)
    steps = [torch.randn(2, 1, 64, generator=generator) for _ in range(3)]
    swap = torch.tensor([1, 0])
    async with swarm_client(path, [(0, 2), (2, 4), (2, 4)]) as h:
        async with h.model.inference_session(max_length=16, batch_size=2) as session:
            expected = [await session.step(x, prompts=prompts)]
            expected.append(await session.step(steps[0], hypo_ids=swap))
            expected += [await session.step(s) for s in steps[1:]]
        async with h.model.inference_session(max_length=16, batch_size=2) as session:
            got = [await session.step(x, prompts=prompts)]
            got.append(await session.step(steps[0], hypo_ids=swap))
            h.black_hole(session.route[1].peer)
            got += [await session.step(s) for s in steps[1:]]
            assert session.stats.failovers == 1 and session.stats.replayed_tokens == 5
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        await h.assert_clean()


async def test_a_cancelled_step_that_reordered_rows_leaves_the_session_exact(root: Path):
    """A reorder cannot be rolled back: the hops that took the cancelled step are rebuilt from
    their history before it, and retrying the step gives the undisturbed outputs."""
    path = tiny_model("llama", root)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 64, generator=generator)
    step = torch.randn(2, 1, 64, generator=generator)
    swap = torch.tensor([1, 0])
    async with swarm_client(path, [(0, 2), (2, 4)]) as h:
        async with h.model.inference_session(max_length=16, batch_size=2) as twin:
            expected = [await twin.step(x), await twin.step(step, hypo_ids=swap)]
        async with h.model.inference_session(max_length=16, batch_size=2) as session:
            first = await session.step(x)
            stall_next_step(h, session.route[1].peer, 1.0)
            with anyio.move_on_after(0.2) as scope:  # hop 0 takes the reorder, hop 1 stalls
                await session.step(step, hypo_ids=swap)
            assert scope.cancelled_caught and session.position == 4
            second = await session.step(step, hypo_ids=swap)
            assert session.stats.replayed_tokens == 8  # both hops rebuilt: 2 rows x 4
            assert not h.model.router.banned()
        torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(second, expected[1], atol=1e-5, rtol=1e-4)
        await h.assert_clean()
