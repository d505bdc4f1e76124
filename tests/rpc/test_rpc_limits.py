"""Message limits and malformed input: the offending stream fails, the endpoint serves on."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import anyio
import numpy as np
import pytest

from distllm.config import RpcConfig, WireLimits
from distllm.errors import LimitExceeded, RemoteError, RemoteProtocolError
from distllm.ids import PeerID
from distllm.rpc import RpcEndpoint
from distllm.rpc.envelope import RpcError, RpcOpen
from distllm.testing import MemoryNetwork, identity_for, memory_rpc_endpoints
from distllm.transport.base import Stream
from distllm.wire.framing import FrameDecoder, encode_frame
from distllm.wire.messages import decode_message, encode_message, message
from distllm.wire.tensors import WireTensor

pytestmark = pytest.mark.anyio

SMALL = RpcConfig(
    limits=WireLimits(max_frame_bytes=64 * 1024, max_header_bytes=4096, max_tensor_bytes=32 * 1024)
)
BIG_TENSOR = WireTensor.from_numpy(np.zeros(16 * 1024, np.float32))  # 64 KiB


@message("test.rpc_limits.blob")
@dataclass(frozen=True, slots=True)
class Blob:
    size: int
    data: WireTensor | None = None


async def make_blob(caller: PeerID, request: Blob) -> Blob:
    return Blob(request.size, WireTensor.from_numpy(np.zeros(request.size, np.uint8)))


async def echo(caller: PeerID, request: Blob) -> Blob:
    return request


def install(server: RpcEndpoint) -> None:
    server.add_unary("make", make_blob, Blob)
    server.add_unary("echo", echo, Blob)


def frame(msg: object) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(encode_message(msg), 2**20))


async def read_messages(stream: Stream) -> list[object]:
    """Every message until the end of ``stream`` (raw transport side)."""
    decoder = FrameDecoder(2**20)
    out: list[object] = []
    while True:
        try:
            decoder.feed(await stream.receive())
        except anyio.EndOfStream:
            return out
        while (body := decoder.next_frame()) is not None:
            out.append(decode_message(body))


async def test_oversized_request_fails_locally_before_sending() -> None:
    network = MemoryNetwork()
    async with memory_rpc_endpoints(2, network=network, config=SMALL) as (server, client):
        install(server)
        with pytest.raises(LimitExceeded):
            await client.call(server.address, "echo", Blob(0, BIG_TENSOR))
        assert network.stats(client.peer_id).streams_opened == 0
        async with client.open_stream(server.address, "echo") as stream:
            with pytest.raises(LimitExceeded):
                await stream.send(Blob(0, BIG_TENSOR))
            await stream.send(Blob(1))  # nothing of the refused message went out
            assert await stream.receive() == Blob(1)


async def test_oversized_request_on_receipt_is_rejected_by_the_callee() -> None:
    network = MemoryNetwork()
    async with (
        memory_rpc_endpoints(1, network=network, config=SMALL) as (server,),
        memory_rpc_endpoints(1, network=network, first_index=1) as (client,),
    ):
        install(server)
        with pytest.raises(RemoteError) as info:
            await client.call(server.address, "echo", Blob(0, BIG_TENSOR))
        assert info.value.type_name == "RemoteProtocolError"
        assert await client.call(server.address, "echo", Blob(2)) == Blob(2)
        assert client.transport.is_connected(server.peer_id)


async def test_oversized_response_on_receipt_is_remote_protocol_error() -> None:
    network = MemoryNetwork()
    async with (
        memory_rpc_endpoints(1, network=network) as (server,),
        memory_rpc_endpoints(1, network=network, config=SMALL, first_index=1) as (client,),
    ):
        install(server)
        with pytest.raises(RemoteProtocolError):
            await client.call(server.address, "make", Blob(100_000))
        assert client.transport.is_connected(server.peer_id)
        reply = await client.call(server.address, "make", Blob(1000), response_type=Blob)
        assert reply.data is not None and reply.data.shape == (1000,)


async def test_oversized_response_from_a_handler_is_reported_as_limit_exceeded() -> None:
    async with memory_rpc_endpoints(2, config=SMALL) as (server, client):
        install(server)
        with pytest.raises(LimitExceeded):
            await client.call(server.address, "make", Blob(100_000))


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack(">I", 5) + b"\xff\x00\x01\x02\x03", id="malformed-body"),
        pytest.param(struct.pack(">I", 2**31), id="huge-length-prefix"),
        pytest.param(frame(Blob(1)), id="first-frame-not-rpc-open"),
        pytest.param(frame(RpcOpen("echo", -1.0)), id="negative-timeout"),
        pytest.param(frame(RpcOpen("echo", float("nan"))), id="nan-timeout"),
        pytest.param(frame(RpcOpen("echo", 5.0)) + frame(RpcOpen("echo", 5.0)), id="bad-request"),
    ],
)
async def test_malformed_input_fails_only_that_stream(garbage: bytes) -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        raw = await client.transport.open_stream(server.address)
        async with raw:
            await raw.send(garbage)
            with anyio.fail_after(5):
                replies = await read_messages(raw)
        assert len(replies) == 1
        assert isinstance(replies[0], RpcError)
        assert replies[0].type_name == "RemoteProtocolError"
        assert await client.call(server.address, "echo", Blob(3)) == Blob(3)


async def test_stream_truncated_mid_frame_is_remote_protocol_error() -> None:
    async with memory_rpc_endpoints(2) as (server, client):
        install(server)
        raw = await client.transport.open_stream(server.address)
        async with raw:
            whole = frame(RpcOpen("echo", 5.0)) + frame(Blob(1))
            await raw.send(whole[:-3])
            await raw.send_eof()
            with anyio.fail_after(5):
                (reply,) = await read_messages(raw)
        assert isinstance(reply, RpcError)
        assert "middle of a frame" in reply.message


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(struct.pack(">I", 3) + b"\x01\x02\x03", id="malformed"),
        pytest.param(frame(Blob(1))[:-2], id="truncated"),
        pytest.param(frame(RpcOpen("x", None)), id="rpc-open-as-reply"),
    ],
)
async def test_malformed_reply_is_remote_protocol_error(answer: bytes) -> None:
    network = MemoryNetwork()

    async def bad_server(stream: Stream) -> None:
        await stream.receive()
        await stream.send(answer)
        await stream.send_eof()

    async with (
        memory_rpc_endpoints(2, network=network) as (good, client),
        network.endpoint(identity_for(50)) as raw_server,
    ):
        install(good)
        raw_server.set_stream_handler(bad_server)
        with anyio.fail_after(5), pytest.raises(RemoteProtocolError):
            await client.call(raw_server.address, "echo", Blob(1))
        assert await client.call(good.address, "echo", Blob(4)) == Blob(4)
