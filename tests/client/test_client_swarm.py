"""The client's swarm view: merging per-block announcements, states, expiry, RTTs, coverage."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.client.swarm import DEFAULT_RTT, SwarmView
from distllm.dht.records import SignedEntry
from distllm.dht.schema import ServerRecord, ServerState, sign_server_record
from distllm.identity import Identity
from distllm.ids import PeerAddress

MODEL = "tiny-llama"
NOW = 1_700_000_000.0
IDS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(6)]


def record(
    who: int,
    start: int,
    end: int,
    *,
    state: ServerState = ServerState.ONLINE,
    model: str = MODEL,
    addresses: int = 1,
    **changes: object,
) -> ServerRecord:
    peer = IDS[who].peer_id
    fields: dict[str, object] = {
        "peer_id": peer,
        "addresses": tuple(f"distllm://{peer}@127.0.0.{n + 1}:4000" for n in range(addresses)),
        "state": state,
        "model": model,
        "start": start,
        "end": end,
        "throughput": 10.0,
        "inference_rps": 10.0,
        "forward_rps": 1000.0,
        "free_cache_tokens": 4096,
        "dtype": "float32",
        "quantization": None,
        "adapters": (),
        "version": "0.1.0",
    }
    fields.update(changes)
    return ServerRecord(**fields)  # type: ignore[arg-type]


def entries(rec: ServerRecord, expires_in: float = 60.0) -> dict[int, list[SignedEntry]]:
    """The entries a lookup of each block key would return, by block."""
    signed = sign_server_record(IDS[_who(rec)], rec, NOW + expires_in)
    return {int(e.key.rpartition("/")[2]): [e] for e in signed}


def merged(*parts: dict[int, list[SignedEntry]]) -> dict[int, list[SignedEntry]]:
    out: dict[int, list[SignedEntry]] = {}
    for part in parts:
        for block, found in part.items():
            out.setdefault(block, []).extend(found)
    return out


def _who(rec: ServerRecord) -> int:
    return next(i for i, ident in enumerate(IDS) if ident.peer_id == rec.peer_id)


def test_one_server_info_per_peer_from_its_per_block_copies() -> None:
    view = SwarmView.from_entries(MODEL, 8, merged(entries(record(0, 0, 4))), NOW)
    assert list(view.servers) == [IDS[0].peer_id]
    info = view.servers[IDS[0].peer_id]
    assert (info.start, info.end, info.expiration) == (0, 4, NOW + 60)
    assert info.address == PeerAddress.parse(f"distllm://{IDS[0].peer_id}@127.0.0.1:4000")
    assert [view.servers_for_block(b) for b in range(4)] == [[info]] * 4
    assert view.uncovered_blocks() == [4, 5, 6, 7]
    assert view.uncovered_blocks(2, 4) == []


def test_only_online_servers_are_routable() -> None:
    found = merged(
        entries(record(0, 0, 2)),
        entries(record(1, 0, 2, state=ServerState.JOINING)),
        entries(record(2, 0, 2, state=ServerState.OFFLINE)),
    )
    view = SwarmView.from_entries(MODEL, 2, found, NOW)
    assert list(view.servers) == [IDS[0].peer_id]


@pytest.mark.parametrize("new_first", [False, True])
def test_the_newest_record_wins_whatever_the_order(new_first: bool) -> None:
    old = entries(record(0, 0, 4), expires_in=30)
    new = entries(record(0, 4, 8, free_cache_tokens=7), expires_in=60)
    view = SwarmView(MODEL, 8)
    for part in [new, old] if new_first else [old, new]:
        view.update(part, NOW)
    info = view.servers[IDS[0].peer_id]
    assert (info.start, info.end, info.free_cache_tokens) == (4, 8, 7)
    assert view.uncovered_blocks() == [0, 1, 2, 3]  # old copies under blocks 0-3 are ignored


def test_a_newer_offline_record_masks_older_online_copies() -> None:
    online = entries(record(0, 0, 4), expires_in=30)
    # The OFFLINE announcement reached only block 3's replicas.
    offline = {3: entries(record(0, 0, 4, state=ServerState.OFFLINE), expires_in=60)[3]}
    view = SwarmView.from_entries(MODEL, 4, merged(online, offline), NOW)
    assert dict(view.servers) == {}
    view.update(online, NOW)  # stale ONLINE copies arriving later change nothing
    assert dict(view.servers) == {}


def test_expired_entries_are_dropped_and_expire_forgets() -> None:
    found = merged(entries(record(0, 0, 2), expires_in=10), entries(record(1, 0, 2), expires_in=-1))
    view = SwarmView.from_entries(MODEL, 2, found, NOW)
    assert list(view.servers) == [IDS[0].peer_id]
    view.expire(NOW + 10)
    assert dict(view.servers) == {}
    assert view.uncovered_blocks() == [0, 1]


def test_invalid_entries_are_counted_and_dropped() -> None:
    good = entries(record(0, 0, 2))
    forged = dataclasses.replace(entries(record(1, 0, 2))[0][0], signature=bytes(64))
    other_model = entries(record(2, 0, 2, model="other"))[0][0]
    misfiled = entries(record(3, 0, 1))[0][0]  # block 0's entry handed in as block 1's
    view = SwarmView(MODEL, 2)
    invalid = view.update({0: [*good[0], forged, other_model], 1: [*good[1], misfiled]}, NOW)
    assert invalid == 3
    assert list(view.servers) == [IDS[0].peer_id]
    assert view.update({5: good[0]}, NOW) == 1  # a block the model does not have


def test_verify_false_trusts_the_caller() -> None:
    forged = dataclasses.replace(entries(record(1, 0, 1))[0][0], signature=bytes(64))
    view = SwarmView.from_entries(MODEL, 1, {0: [forged]}, NOW, verify=False)
    assert list(view.servers) == [IDS[1].peer_id]


def test_spans_are_clipped_and_undialable_servers_skipped() -> None:
    found = merged(
        entries(record(0, 2, 6)),
        entries(record(1, 0, 1, addresses=0)),
        entries(record(2, 0, 3, addresses=2)),
    )
    view = SwarmView.from_entries(MODEL, 4, found, NOW)
    assert (view.servers[IDS[0].peer_id].start, view.servers[IDS[0].peer_id].end) == (2, 4)
    assert IDS[1].peer_id not in view.servers
    assert len(view.servers[IDS[2].peer_id].addresses) == 2


def test_servers_for_block_are_in_peer_id_order() -> None:
    found = merged(*(entries(record(i, 0, 1)) for i in range(5)))
    view = SwarmView.from_entries(MODEL, 1, found, NOW)
    peers = [info.peer for info in view.servers_for_block(0)]
    assert peers == sorted(ident.peer_id for ident in IDS[:5])
    assert list(view.servers) == peers
    with pytest.raises(ValueError, match="block must be"):
        view.servers_for_block(1)


def test_rtts_default_and_survive_updates() -> None:
    view = SwarmView.from_entries(MODEL, 2, merged(entries(record(0, 0, 2))), NOW)
    peer = IDS[0].peer_id
    assert view.rtt(peer) == DEFAULT_RTT == 0.15
    assert view.unmeasured() == [peer]
    view.set_rtt(peer, 0.02)
    view.update(entries(record(0, 0, 2), expires_in=90), NOW)
    assert view.rtt(peer) == 0.02
    assert view.unmeasured() == []
    assert SwarmView(MODEL, 2, default_rtt=0.5).rtt(peer) == 0.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="RTT"):
            view.set_rtt(peer, bad)


def test_uncovered_blocks_excluding_peers() -> None:
    found = merged(entries(record(0, 0, 3)), entries(record(1, 2, 4)))
    view = SwarmView.from_entries(MODEL, 5, found, NOW)
    assert view.uncovered_blocks() == [4]
    assert view.uncovered_blocks(excluding={IDS[1].peer_id}) == [3, 4]
    assert view.uncovered_blocks(1, 4, excluding={IDS[0].peer_id}) == [1]
    with pytest.raises(ValueError, match="range"):
        view.uncovered_blocks(3, 6)


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        SwarmView(MODEL, 0)
    with pytest.raises(ValueError, match="model"):
        SwarmView("has space", 4)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_view_equals_newest_online_record_per_peer(data: st.DataObject) -> None:
    num_blocks = 4
    announcements = []  # (who, record, expires_in); expirations distinct: no ties
    for n in range(data.draw(st.integers(0, 8))):
        who = data.draw(st.integers(0, 3))
        start = data.draw(st.integers(0, num_blocks - 1))
        end = data.draw(st.integers(start + 1, num_blocks))
        state = data.draw(st.sampled_from(ServerState))
        expires_in = data.draw(st.sampled_from([-5.0, 10.0, 20.0, 30.0])) + n / 100
        announcements.append((who, record(who, start, end, state=state), expires_in))
    # Each lookup may miss some copies, and the view may get them in any order.
    parts = []
    for _, rec, expires_in in announcements:
        found = entries(rec, expires_in)
        keep = data.draw(st.sets(st.sampled_from(sorted(found)), min_size=1))
        parts.append({b: found[b] for b in keep})
    view = SwarmView(MODEL, num_blocks)
    for part in data.draw(st.permutations(parts)):
        view.update(part, NOW)

    expected = {}
    for who in range(4):
        live = [(e, rec) for w, rec, e in announcements if w == who and e > 0]
        if live:
            newest = max(live, key=lambda pair: pair[0])[1]
            if newest.state is ServerState.ONLINE:
                expected[IDS[who].peer_id] = newest
    assert {peer: info.record for peer, info in view.servers.items()} == expected
    for b in range(num_blocks):
        assert view.servers_for_block(b) == [i for i in view.servers.values() if i.holds(b)]
