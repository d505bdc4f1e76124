"""Server-to-server relay: steps go from server to server, with the tokens and outputs of the
hop-by-hop route, and fall back to hop by hop wherever the chain breaks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anyio
import pytest
import torch
from client_harness import FAST, SERVER_CONFIG, hf_greedy, swarm_client, tiny_model
from test_client_failover import stall_next_step

from distllm.client.events import HopFailed
from distllm.client.generation import SamplingParams, generate_ids
from distllm.client.session import InferenceSession

pytestmark = pytest.mark.anyio

PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])
#: Three hops over the tiny Llama's 4 blocks.
SPANS = [(0, 1), (1, 3), (3, 4)]
HOP_BY_HOP = dataclasses.replace(FAST, relay=False)
#: For tests that count relayed steps: links open however loaded the machine (a link still
#: opening after relay_timeout would let a step go hop by hop).
PATIENT = dataclasses.replace(SERVER_CONFIG, relay_timeout=1.5)


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


async def _greedy(session: InferenceSession, new_tokens: int) -> list[int]:
    stream = generate_ids(session, PROMPT, new_tokens, SamplingParams(), stop_at_eos=False)
    return [int(token) async for token in stream]


async def test_relayed_steps_give_the_outputs_of_hop_by_hop_steps(root: Path):
    path = tiny_model("llama", root)
    outputs: dict[bool, list[torch.Tensor]] = {}
    for relay in (True, False):
        config = FAST if relay else HOP_BY_HOP
        async with swarm_client(path, SPANS, config=config, server_config=PATIENT) as h:
            hidden = h.model.parts.embed(PROMPT)
            async with h.model.inference_session(max_length=16) as session:
                outputs[relay] = [await session.step(hidden[:, :4])]
                for t in range(4, PROMPT.shape[1]):
                    outputs[relay].append(await session.step(hidden[:, t : t + 1]))
                # Every step reached hops 1 and 2 from the server before them, or none did.
                expected_relayed = 2 * session.stats.steps if relay else 0
                assert session.stats.relayed_steps == expected_relayed
                assert session.stats.lost_relays == 0
            await h.assert_clean()
    for relayed, hop_by_hop in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(relayed, hop_by_hop)


async def test_relayed_generation_equals_transformers(root: Path):
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 8)
    async with swarm_client(path, SPANS, server_config=PATIENT) as h:
        async with h.model.inference_session(max_length=32) as session:
            assert await _greedy(session, 8) == expected
            assert session.stats.relayed_steps == 2 * session.stats.steps
        await h.assert_clean()


async def test_servers_that_cannot_reach_each_other_fall_back_to_hop_by_hop(root: Path):
    """Relays between the first two servers vanish, with the client reaching both: the client
    learns it from the sender (``relayed=False``) or from a probe of the receiver, sends those
    steps itself, and after a few lost relays stops relaying."""
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 10)
    async with swarm_client(path, SPANS) as h:
        async with h.model.inference_session(max_length=32) as session:
            tokens = []
            stream = generate_ids(session, PROMPT, 10, SamplingParams(), stop_at_eos=False)
            async for token in stream:
                tokens.append(int(token))
                if len(tokens) == 2:  # their connection exists by now: relays get lost in it
                    first, second = session.route[0].peer, session.route[1].peer
                    h.swarm.network.partition([first], [second])
            assert tokens == expected
            assert session.stats.lost_relays == 3  # then relay is off for the session
            assert not [e for e in session.events if isinstance(e, HopFailed)]
            assert not h.model.router.banned()  # nobody's fault the client could see
        h.swarm.network.heal()
        await h.assert_clean()


async def test_a_server_that_relayed_and_then_vanished_is_replaced_exactly(root: Path):
    """The middle server relays its output to the last one but its answer to the client is
    lost: the client replaces it, the replacement relays the same step again (the last server
    rolls back and computes it anew), and the stale output the last server had sent is skipped.
    """
    path = tiny_model("llama", root)
    expected = hf_greedy(path, PROMPT, 10)
    spans = [(0, 1), (1, 3), (1, 3), (3, 4)]  # a standby for the middle span
    async with swarm_client(path, spans) as h:
        async with h.model.inference_session(max_length=32) as session:
            tokens = []
            victim = None
            async for token in generate_ids(session, PROMPT, 10, SamplingParams()):
                tokens.append(int(token))
                if len(tokens) == 4:
                    victim = session.route[1].peer
                    h.swarm.network.partition([h.client.peer_id], [victim])
            assert tokens == expected
            (failure,) = [e for e in session.events if isinstance(e, HopFailed)]
            assert failure.hop.peer == victim and failure.index == 1
            assert session.stats.failovers == 1
        h.swarm.network.heal()
        await h.assert_clean()


async def test_row_reorders_go_hop_by_hop(root: Path):
    path = tiny_model("llama", root)
    async with swarm_client(path, SPANS, server_config=PATIENT) as h:
        hidden = h.model.parts.embed(torch.tensor([[5, 17, 33], [40, 9, 61]]))
        async with h.model.inference_session(max_length=8, batch_size=2) as session:
            await session.step(hidden[:, :2])
            assert session.stats.relayed_steps == 2
            await session.step(hidden[:, 2:], hypo_ids=torch.tensor([1, 0]))
            assert session.stats.relayed_steps == 2  # the reorder was sent to every hop
            await session.step(hidden[:, 2:], start_from_position=2)
            assert session.stats.relayed_steps == 4
        await h.assert_clean()


async def test_a_cancelled_relayed_step_leaves_the_session_exact(root: Path):
    """Cancelled while the last hop's relayed step is in flight: the next step rolls every
    server that took it back, and the outputs are those of an undisturbed session."""
    path = tiny_model("llama", root)
    async with swarm_client(path, SPANS) as h:
        hidden = h.model.parts.embed(PROMPT)
        async with h.model.inference_session(max_length=16) as twin:
            expected = [await twin.step(hidden[:, :4]), await twin.step(hidden[:, 4:])]
        async with h.model.inference_session(max_length=16) as session:
            first = await session.step(hidden[:, :4])
            stall_next_step(h, session.route[2].peer, 1.0)
            with anyio.move_on_after(0.2) as scope:
                await session.step(hidden[:, 4:])
            assert scope.cancelled_caught and session.position == 4
            second = await session.step(hidden[:, 4:])
        assert torch.equal(first, expected[0])
        torch.testing.assert_close(second, expected[1], atol=1e-5, rtol=1e-4)
        await h.assert_clean()
