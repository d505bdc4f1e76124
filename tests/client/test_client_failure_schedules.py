"""Hypothesis: for any failure schedule, generation gives the tokens of a run without failures.

The swarm serves blocks [0, 2) and [2, 4) of a tiny Llama, each on two servers (one standby).
A schedule says which hop of the session fails before which step, and how:

- ``black_hole``: the server's machine vanishes (nothing gets through, as after kill -9 or a
  power cut: noticed after ``dead_peer_timeout``);
- ``leave``: the server shuts down cleanly (its sessions end with ``Busy``);
- ``busy``: the server refuses the step with ``Busy``;
- ``stall``: the server hangs beyond the client's ``step_timeout``;
- ``partition``: the network between client and server is cut for a moment (0.3 s): with
  relay on, a server may have relayed its output on before its answer to the client is lost;
- ``relay_cut``: the server cannot reach the other servers for a moment (0.3 s), the client can:
  relayed steps to and from it are lost.

The first two remove a server for good, so a schedule removes at most one per span.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import torch
from client_harness import FAST, Harness, swarm_client, tiny_model
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from distllm.client.generation import SamplingParams, generate_ids
from distllm.config import TransportConfig
from distllm.errors import Busy

pytestmark = pytest.mark.anyio

PROMPT = torch.tensor([[5, 17, 33, 40, 9, 61]])
NEW_TOKENS = 6
SPANS = [(0, 2), (0, 2), (2, 4), (2, 4)]
KINDS = ("black_hole", "leave", "busy", "stall", "partition", "relay_cut")
CONFIG = dataclasses.replace(FAST, step_timeout=0.4, failover_timeout=4.0)
TRANSPORT = TransportConfig(keepalive_interval=0.05, dead_peer_timeout=0.25)

Failure = tuple[int, int, str]  # (before step, hop index, kind)


def _removes_at_most_one_server_per_span(schedule: list[Failure]) -> bool:
    hops = [hop for _, hop, kind in schedule if kind in ("black_hole", "leave")]
    return len(hops) == len(set(hops))


schedules = st.lists(
    st.tuples(st.integers(0, NEW_TOKENS - 1), st.integers(0, 1), st.sampled_from(KINDS)),
    max_size=3,
    unique_by=lambda failure: failure[0],  # one failure per step
).filter(_removes_at_most_one_server_per_span)

_reference: dict[str, list[int]] = {}


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


def _patch_next_step(h: Harness, peer: object, behaviour: str) -> None:
    compute = h.swarm.servers[h.server_index(peer)].server.compute
    original = compute.infer

    async def infer(*args: Any, **kwargs: Any) -> Any:
        compute.infer = original  # type: ignore[method-assign]
        if behaviour == "busy":
            raise Busy("injected", retry_after=0.1)
        await anyio.sleep(2 * CONFIG.step_timeout)
        return await original(*args, **kwargs)

    compute.infer = infer  # type: ignore[method-assign]


async def _inject(h: Harness, peer: Any, kind: str, tg: anyio.abc.TaskGroup) -> None:
    if kind == "black_hole":
        h.black_hole(peer)
    elif kind == "leave":
        h.swarm.stop(h.server_index(peer))
    elif kind == "partition":
        h.swarm.network.partition([h.client.peer_id], [peer])
        tg.start_soon(_heal_after, h, 0.3)
    elif kind == "relay_cut":
        servers = [s.peer_id for s in h.swarm.servers if s.peer_id != peer]
        h.swarm.network.partition([peer], servers)
        tg.start_soon(_heal_after, h, 0.3)
    else:
        _patch_next_step(h, peer, kind)


async def _heal_after(h: Harness, seconds: float) -> None:
    await anyio.sleep(seconds)
    h.swarm.network.heal()


async def _generate(root: Path, schedule: list[Failure]) -> list[int]:
    path = tiny_model("llama", root)
    by_step = {step: (hop, kind) for step, hop, kind in schedule}
    async with (
        swarm_client(path, SPANS, config=CONFIG, transport_config=TRANSPORT) as h,
        anyio.create_task_group() as tg,
    ):
        tokens: list[int] = []
        async with h.model.inference_session(max_length=32) as session:
            stream = generate_ids(session, PROMPT, NEW_TOKENS, SamplingParams(), stop_at_eos=False)
            for step in range(NEW_TOKENS):
                if step in by_step:
                    hop, kind = by_step[step]
                    await _inject(h, session.route[hop].peer, kind, tg)
                tokens.append(int(await anext(stream)))
            await stream.aclose()
        h.swarm.network.heal()
        await h.assert_clean()
        return tokens


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    database=None,
    phases=(Phase.explicit, Phase.generate),  # shrinking a 2-s example would take minutes
)
@given(schedule=schedules)
async def test_any_failure_schedule_gives_the_tokens_of_a_run_without_failures(
    root: Path, schedule: list[Failure]
):
    if "llama" not in _reference:
        _reference["llama"] = await _generate(root, [])
    tokens = await _generate(root, schedule)
    assert tokens == _reference["llama"]
