"""Deadlines, per-peer concurrency limits and dying peers (time runs instantly on trio)."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest
from trio.testing import MockClock

from distllm.config import RpcConfig, TransportConfig
from distllm.errors import Busy, DeadlineExceeded, PeerGone
from distllm.ids import PeerID
from distllm.rpc import RpcEndpoint
from distllm.testing import MemoryNetwork, eventually, identity_for, memory_rpc_endpoints
from distllm.wire.messages import message

pytestmark = pytest.mark.anyio

TRANSPORT = TransportConfig(connect_timeout=0.5, keepalive_interval=0.1, dead_peer_timeout=0.3)
EPS = 0.05


@pytest.fixture(params=["asyncio", "trio-mockclock"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    if request.param == "asyncio":
        return "asyncio"
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


@message("test.rpc_deadlines.job")
@dataclass(frozen=True, slots=True)
class Job:
    seconds: float


class SlowService:
    """``sleep`` handler that records how its calls ended."""

    def __init__(self, expected_starts: int = 1) -> None:
        self.started = 0
        self.cancelled = 0
        self.release = anyio.Event()
        self.all_started = anyio.Event()
        self.all_cancelled = anyio.Event()
        self.expected_starts = expected_starts
        self.expected_cancellations = 1

    async def sleep(self, caller: PeerID, job: Job) -> Job:
        self.started += 1
        if self.started == self.expected_starts:
            self.all_started.set()
        try:
            with anyio.move_on_after(job.seconds):
                await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            if self.cancelled == self.expected_cancellations:
                self.all_cancelled.set()
            raise
        return job

    def install(self, server: RpcEndpoint) -> None:
        server.add_unary("sleep", self.sleep, Job)


async def test_deadline_exceeded_cancels_the_remote_handler() -> None:
    service = SlowService()
    async with memory_rpc_endpoints(2, transport_config=TRANSPORT) as (server, client):
        service.install(server)
        start = anyio.current_time()
        with pytest.raises(DeadlineExceeded):
            await client.call(server.address, "sleep", Job(10.0), timeout=0.2)
        assert 0.2 - EPS <= anyio.current_time() - start <= 0.2 + EPS
        with anyio.fail_after(1):
            await service.all_cancelled.wait()  # the caller's reset reached it
        await eventually(lambda: server.active_calls(client.peer_id) == 0)
        assert await client.call(server.address, "sleep", Job(0.0)) == Job(0.0)


async def test_callee_stops_at_its_copy_of_the_deadline_without_the_reset() -> None:
    network = MemoryNetwork()
    service = SlowService()
    async with memory_rpc_endpoints(2, network=network, transport_config=TRANSPORT) as (
        server,
        client,
    ):
        service.install(server)
        network.set_latency(0.01)

        async def cut_after_request_arrives() -> None:
            await anyio.sleep(0.05)
            network.partition([client.peer_id], [server.peer_id])  # the reset will not arrive

        async with anyio.create_task_group() as tg:
            tg.start_soon(cut_after_request_arrives)
            with pytest.raises(DeadlineExceeded):
                await client.call(server.address, "sleep", Job(10.0), timeout=0.2)
        with anyio.fail_after(0.1):
            await service.all_cancelled.wait()  # relative timeout: ~0.01 s after the caller's
        assert service.started == 1


async def test_concurrent_call_limit_answers_busy_at_once() -> None:
    service = SlowService(expected_starts=2)
    config = RpcConfig(max_concurrent_calls_per_peer=2)
    async with memory_rpc_endpoints(2, config=config, transport_config=TRANSPORT) as (
        server,
        client,
    ):
        service.install(server)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(client.call, server.address, "sleep", Job(10.0))
            await service.all_started.wait()
            start = anyio.current_time()
            with pytest.raises(Busy) as info:
                await client.call(server.address, "sleep", Job(0.0))
            assert anyio.current_time() - start < EPS
            assert info.value.retry_after > 0
            service.release.set()
        assert server.active_calls(client.peer_id) == 0
        assert await client.call(server.address, "sleep", Job(0.0)) == Job(0.0)


async def test_other_peers_are_not_limited_by_a_busy_one() -> None:
    service = SlowService()
    config = RpcConfig(max_concurrent_calls_per_peer=1)
    async with memory_rpc_endpoints(3, config=config, transport_config=TRANSPORT) as (
        server,
        greedy,
        polite,
    ):
        service.install(server)
        async with anyio.create_task_group() as tg:
            tg.start_soon(greedy.call, server.address, "sleep", Job(10.0))
            await service.all_started.wait()
            with pytest.raises(Busy):
                await greedy.call(server.address, "sleep", Job(0.0))
            assert await polite.call(server.address, "sleep", Job(0.0)) == Job(0.0)
            service.release.set()


@pytest.mark.parametrize("detect_immediately", [True, False])
async def test_peer_killed_mid_call_raises_peer_gone(detect_immediately: bool) -> None:
    network = MemoryNetwork()
    service = SlowService()
    async with memory_rpc_endpoints(2, network=network, transport_config=TRANSPORT) as (
        server,
        client,
    ):
        service.install(server)

        async def kill_soon() -> None:
            await anyio.sleep(0.05)
            network.kill(server.peer_id, detect_immediately=detect_immediately)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            start = anyio.current_time()
            with pytest.raises(PeerGone):
                await client.call(server.address, "sleep", Job(10.0), timeout=5)
        expected = 0.05 if detect_immediately else 0.05 + TRANSPORT.dead_peer_timeout
        assert anyio.current_time() - start <= expected + EPS
        with anyio.fail_after(1):
            await service.all_cancelled.wait()  # its dead stream stopped the handler


async def test_closing_the_rpc_endpoint_cancels_running_handlers() -> None:
    network = MemoryNetwork()
    service = SlowService()
    async with (
        memory_rpc_endpoints(1, network=network, transport_config=TRANSPORT) as (client,),
        network.endpoint(identity_for(1), TRANSPORT) as transport,
    ):
        outcome: list[BaseException] = []

        async def caller() -> None:
            try:
                await client.call(transport.address, "sleep", Job(10.0), timeout=5)
            except PeerGone as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg, RpcEndpoint(transport) as server:
            service.install(server)
            tg.start_soon(caller)
            await service.all_started.wait()
            # Leaving the RpcEndpoint cancels the handler; its stream is reset.
        assert service.cancelled == 1
        assert len(outcome) == 1
