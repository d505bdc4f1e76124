from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from distllm.dht.records import verify_entry
from distllm.dht.schema import ServerState, decode_server_entry
from distllm.testing import eventually
from distllm.testing.models import make_tiny_model
from distllm.testing.swarm import local_swarm

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


async def test_servers_announce_their_spans(llama: Path) -> None:
    async with local_swarm(llama, [(0, 2), (2, 4)]) as swarm:
        assert swarm.model_name == "tiny-llama"
        found = await swarm.bootstrap.get_many([f"tiny-llama/{b}" for b in range(4)])
        for block in range(4):
            (entry,) = found[f"tiny-llama/{block}"].values()
            verify_entry(entry)
            record = decode_server_entry(entry)
            assert record.state is ServerState.ONLINE
            assert record.start <= block < record.end
            assert record.free_cache_tokens > 0
        models = await swarm.bootstrap.get("models/tiny-llama")
        assert len(models) == 2  # each server publishes the model record under its own subkey


async def test_placement_fills_the_gap(llama: Path) -> None:
    async with local_swarm(llama, [(0, 2)]) as swarm:
        # A server asked for 2 blocks by count (not by span) takes the uncovered ones.
        from distllm.identity import Identity
        from distllm.rpc import RpcEndpoint
        from distllm.server.swarm_server import SwarmServer, SwarmServerOptions

        identity = Identity.generate()
        async with (
            swarm.network.endpoint(identity, swarm.transport_config) as transport,
            RpcEndpoint(transport) as rpc,
            SwarmServer(
                rpc,
                identity,
                swarm.model,
                initial_peers=swarm.initial_peers,
                num_blocks=2,
                server_config=swarm.server_config,
                dht_config=swarm.dht_config,
                options=SwarmServerOptions(measure_throughput=False),
            ) as server,
        ):
            assert (server.start, server.end) == (2, 4)


async def test_clean_shutdown_announces_offline(llama: Path) -> None:
    async with local_swarm(llama, [(0, 4)]) as swarm:
        swarm.stop(0)

        def offline() -> bool:
            entries = swarm.bootstrap.local_entries("tiny-llama/0")
            states = [decode_server_entry(e).state for e in entries.values()]
            return states == [ServerState.OFFLINE]

        await eventually(offline, within=5)


async def test_rebalancing_moves_to_an_uncovered_span(llama: Path) -> None:
    async with local_swarm(llama, [(0, 2), (0, 2)]) as swarm:
        crowded = swarm.servers[1]
        # blocks 2-3 are uncovered: moving there lifts the bottleneck from 0
        assert await crowded.rebalance_once()
        await eventually(lambda: crowded.moves == 1 and crowded.state is ServerState.ONLINE)
        assert (crowded.start, crowded.end) == (2, 4)
        assert not await swarm.servers[0].rebalance_once()  # now the only holder of 0-1
        with anyio.fail_after(5):
            while True:
                found = await swarm.bootstrap.get("tiny-llama/3")
                states = [decode_server_entry(e).state for e in found.values()]
                if ServerState.ONLINE in states:
                    break
                await anyio.sleep(0.05)


async def test_a_killed_server_leaves_the_swarm_running(llama: Path) -> None:
    async with local_swarm(llama, [(0, 4), (0, 4)]) as swarm:
        swarm.kill(0)  # its OFFLINE announcement cannot get out: must not take the swarm down
        await anyio.sleep(0.2)
        found = await swarm.bootstrap.get("tiny-llama/0")
        states = {
            decode_server_entry(e).peer_id: decode_server_entry(e).state for e in found.values()
        }
        assert states[swarm.servers[1].peer_id] is ServerState.ONLINE
