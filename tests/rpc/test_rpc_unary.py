"""Unary calls over the in-memory transport: replies, reported errors, scale, transport errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import numpy as np
import pytest

from distllm.config import RpcConfig
from distllm.errors import (
    Busy,
    ConnectError,
    LimitExceeded,
    PeerIdentityMismatch,
    RemoteError,
    RemoteProtocolError,
)
from distllm.ids import PeerAddress, PeerID
from distllm.rpc import RpcEndpoint, UnknownMethod
from distllm.testing import MemoryNetwork, eventually, identity_for, memory_rpc_endpoints
from distllm.wire.messages import message
from distllm.wire.tensors import WireTensor

pytestmark = pytest.mark.anyio


@message("test.rpc_unary.scale")
@dataclass(frozen=True, slots=True)
class Scale:
    factor: float
    values: WireTensor
    tags: tuple[str, ...] = ()


@message("test.rpc_unary.scaled")
@dataclass(frozen=True, slots=True)
class Scaled:
    values: WireTensor
    served_by: str


@message("test.rpc_unary.ping")
@dataclass(frozen=True, slots=True)
class Ping:
    n: int


async def scale(caller: PeerID, request: Scale) -> Scaled:
    values = request.values.to_numpy() * request.factor
    return Scaled(WireTensor.from_numpy(values), ",".join(request.tags))


async def ping(caller: PeerID, request: Ping) -> Ping:
    return Ping(request.n + 1)


async def fail(caller: PeerID, request: Ping) -> Ping:
    if request.n == 0:
        raise ValueError("n must not be zero")
    if request.n == 1:
        raise Busy("queue full", retry_after=2.5)
    if request.n == 2:
        raise LimitExceeded("too many tokens")
    raise KeyError("bug")


def serve_basics(server: RpcEndpoint) -> None:
    server.add_unary("scale", scale, Scale)
    server.add_unary("ping", ping, Ping)
    server.add_unary("fail", fail, Ping)


async def test_unary_echo_with_tensors() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        values = np.arange(12, dtype=np.float32).reshape(3, 4)
        request = Scale(2.0, WireTensor.from_numpy(values), ("a", "b"))
        reply = await client.call(server.address, "scale", request, response_type=Scaled)
        np.testing.assert_array_equal(reply.values.to_numpy(), values * 2)
        assert reply.served_by == "a,b"


async def test_handler_error_reaches_caller_and_connection_survives() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(RemoteError) as info:
            await client.call(server.address, "fail", Ping(0))
        assert (info.value.type_name, info.value.message) == ("ValueError", "n must not be zero")
        assert client.transport.is_connected(server.peer_id)
        assert await client.call(server.address, "ping", Ping(41)) == Ping(42)


async def test_busy_round_trip_keeps_retry_after() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(Busy) as info:
            await client.call(server.address, "fail", Ping(1))
        assert info.value.retry_after == 2.5
        assert info.value.message == "queue full"
        with pytest.raises(LimitExceeded, match="too many tokens"):
            await client.call(server.address, "fail", Ping(2))


async def test_handler_bug_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="distllm.rpc")
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(RemoteError) as info:
            await client.call(server.address, "fail", Ping(3))
        assert info.value.type_name == "KeyError"
    records = [r for r in caplog.records if r.name == "distllm.rpc" and r.exc_info]
    assert len(records) == 1
    assert "fail" in records[0].getMessage()


async def test_unknown_method_is_typed_and_connection_survives() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(UnknownMethod) as info:
            await client.call(server.address, "nope", Ping(1))
        assert isinstance(info.value, RemoteError)
        assert info.value.type_name == "UnknownMethod"
        assert await client.call(server.address, "ping", Ping(1)) == Ping(2)


async def test_wrong_request_type_is_rejected_by_the_callee() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(RemoteError) as info:
            await client.call(server.address, "scale", Ping(1))
        assert info.value.type_name == "RemoteProtocolError"
        assert "takes Scale" in info.value.message
        assert await client.call(server.address, "ping", Ping(1)) == Ping(2)


async def test_unexpected_response_type_is_remote_protocol_error() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(RemoteProtocolError, match="expected Scaled"):
            await client.call(server.address, "ping", Ping(1), response_type=Scaled)


async def test_relayed_remote_error_is_not_mistaken_for_our_own() -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(3, network=network) as (far, relay, client):

        async def forward(caller: PeerID, request: Ping) -> object:
            return await relay.call(far.address, "missing", request)

        relay.add_unary("forward", forward, Ping)
        with pytest.raises(RemoteError) as info:
            await client.call(relay.address, "forward", Ping(1))
        assert not isinstance(info.value, UnknownMethod)
        assert "UnknownMethod" in info.value.message


async def test_transport_errors_propagate_unchanged() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        nobody = PeerAddress(identity_for(77).peer_id, "mem", 9)
        with pytest.raises(ConnectError):
            await client.call(nobody, "ping", Ping(1))
        impostor = PeerAddress(identity_for(78).peer_id, server.address.host, server.address.port)
        with pytest.raises(PeerIdentityMismatch):
            await client.call(impostor, "ping", Ping(1))


async def test_thousand_concurrent_unary_calls_leave_no_streams() -> None:
    network = MemoryNetwork()
    config = RpcConfig(max_concurrent_calls_per_peer=1000)
    async with memory_rpc_endpoints(2, network=network, config=config) as (server, client):

        async def slow_ping(caller: PeerID, request: Ping) -> Ping:
            await anyio.sleep(0.01)  # all 1000 are in flight at once
            return Ping(request.n * 2)

        server.add_unary("ping", slow_ping, Ping)
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await client.call(server.address, "ping", Ping(i))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(one, i)
        assert results == {i: Ping(2 * i) for i in range(1000)}
        await eventually(lambda: network.open_streams() == 0)  # callees close after our FIN
        assert network.stats(client.peer_id).resets_sent == 0  # every call ended cleanly
        assert server.active_calls(client.peer_id) == 0


async def test_unsendable_reply_is_reported_as_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    async def returns_junk(caller: PeerID, request: Ping) -> object:
        return {"not": "a registered message"}

    caplog.set_level(logging.ERROR, logger="distllm.rpc")
    async with memory_rpc_endpoints(2) as (server, client):
        server.add_unary("junk", returns_junk, Ping)
        with pytest.raises(RemoteError) as info:
            await client.call(server.address, "junk", Ping(1))
        assert info.value.type_name == "LocalProtocolError"
    assert any(r.exc_info for r in caplog.records if r.name == "distllm.rpc")


async def test_registration_and_argument_checks() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        serve_basics(server)
        with pytest.raises(ValueError, match="already registered"):
            server.add_unary("ping", ping, Ping)
        with pytest.raises(ValueError, match="timeout"):
            await client.call(server.address, "ping", Ping(1), timeout=0)
