from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import pytest

from distllm.dht.records import RecordStore, SignedEntry, verify_entry
from distllm.dht.schema import (
    ModelRecord,
    ServerRecord,
    ServerState,
    decode_model_entry,
    decode_server_entry,
)
from distllm.errors import ConnectError
from distllm.identity import Identity
from distllm.server.announcer import Announcer
from distllm.testing import eventually

pytestmark = pytest.mark.anyio


class FakeDHT:
    """Stores into a real record store (signature and schema checks included)."""

    def __init__(self) -> None:
        self.store = RecordStore()
        self.fail = False

    async def store_many(self, entries: Sequence[SignedEntry]) -> list[int]:
        if self.fail:
            raise ConnectError("no DHT node reachable")
        return [int(self.store.store(entry, time.time())) for entry in entries]

    def states(self, key: str) -> list[ServerState]:
        return [decode_server_entry(e).state for e in self.store.get(key, time.time()).values()]


def make_factory(identity: Identity, free: list[int]):  # type: ignore[no-untyped-def]
    def make(state: ServerState) -> ServerRecord:
        return ServerRecord(
            peer_id=identity.peer_id,
            addresses=(f"distllm://{identity.peer_id}@127.0.0.1:1234",),
            state=state,
            model="tiny",
            start=2,
            end=4,
            throughput=10.0,
            inference_rps=10.0,
            forward_rps=100.0,
            free_cache_tokens=free[0],
            dtype="float32",
            quantization=None,
            adapters=(),
            version="test",
        )

    return make


async def test_lifecycle_joining_online_offline() -> None:
    identity = Identity.generate()
    dht = FakeDHT()
    free = [4096]
    model = ModelRecord("tiny", 6, "local/tiny", b"\x00" * 32)
    announcer = Announcer(
        dht, identity, make_factory(identity, free), model_record=model, period=0.05
    )
    async with anyio.create_task_group() as tg:
        await tg.start(announcer.run)
        await eventually(lambda: dht.states("tiny/2") == [ServerState.JOINING], within=2)
        announcer.set_state(ServerState.ONLINE)
        free[0] = 1024  # re-announcements carry fresh load figures
        with anyio.fail_after(2):
            while True:
                records = [
                    decode_server_entry(e) for e in dht.store.get("tiny/3", time.time()).values()
                ]
                if records and records[0].free_cache_tokens == 1024:
                    break
                await anyio.sleep(0.01)
        assert records[0].state is ServerState.ONLINE
        (model_entry,) = dht.store.get("models/tiny", time.time()).values()
        verify_entry(model_entry)
        assert decode_model_entry(model_entry).num_blocks == 6
        tg.cancel_scope.cancel()
    assert dht.states("tiny/2") == [ServerState.OFFLINE]
    assert dht.states("tiny/3") == [ServerState.OFFLINE]


async def test_records_expire_after_ttl() -> None:
    identity = Identity.generate()
    dht = FakeDHT()
    announcer = Announcer(dht, identity, make_factory(identity, [1]), period=10.0, ttl=25.0)
    await announcer.announce()
    (entry,) = dht.store.get("tiny/2", time.time()).values()
    assert time.time() + 20 < entry.expiration <= time.time() + 25
    assert dht.store.get("tiny/2", time.time() + 26) == {}


async def test_unreachable_dht_does_not_stop_the_loop() -> None:
    identity = Identity.generate()
    dht = FakeDHT()
    dht.fail = True
    announcer = Announcer(dht, identity, make_factory(identity, [1]), period=0.02)
    async with anyio.create_task_group() as tg:
        await tg.start(announcer.run)
        await anyio.sleep(0.1)
        assert announcer.announcements == 0
        dht.fail = False
        await eventually(lambda: announcer.announcements > 0, within=2)
        tg.cancel_scope.cancel()
    assert dht.states("tiny/2") == [ServerState.OFFLINE]


def test_bad_periods() -> None:
    identity = Identity.generate()
    with pytest.raises(ValueError, match="period must be > 0"):
        Announcer(FakeDHT(), identity, make_factory(identity, [1]), period=0)
    with pytest.raises(ValueError, match="ttl must be > period"):
        Announcer(FakeDHT(), identity, make_factory(identity, [1]), period=5, ttl=5)
