"""Shared by the routing tests: small swarm views built from signed records (no network)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distllm.client.swarm import SwarmView
from distllm.dht.records import SignedEntry
from distllm.dht.schema import ServerRecord, ServerState, sign_server_record
from distllm.identity import Identity
from distllm.ids import PeerID

MODEL = "tiny-llama"
NOW = 1_700_000_000.0
IDS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(8)]


@dataclass(frozen=True)
class Spec:
    """One server of a test swarm (``who`` indexes IDS)."""

    who: int
    start: int
    end: int
    inference_rps: float = 10.0
    forward_rps: float = 1000.0
    free_cache_tokens: int = 4096
    rtt: float | None = None  # None: not measured
    adapters: tuple[str, ...] = ()


def make_view(num_blocks: int, specs: Sequence[Spec]) -> SwarmView:
    found: dict[int, list[SignedEntry]] = {}
    for spec in specs:
        peer = IDS[spec.who].peer_id
        record = ServerRecord(
            peer_id=peer,
            addresses=(f"distllm://{peer}@10.0.0.{spec.who + 1}:4000",),
            state=ServerState.ONLINE,
            model=MODEL,
            start=spec.start,
            end=spec.end,
            throughput=spec.inference_rps,
            inference_rps=spec.inference_rps,
            forward_rps=spec.forward_rps,
            free_cache_tokens=spec.free_cache_tokens,
            dtype="float32",
            quantization=None,
            adapters=spec.adapters,
            version="0.1.0",
        )
        for entry in sign_server_record(IDS[spec.who], record, NOW + 60):
            found.setdefault(int(entry.key.rpartition("/")[2]), []).append(entry)
    view = SwarmView.from_entries(MODEL, num_blocks, found, NOW, verify=False)
    for spec in specs:
        if spec.rtt is not None:
            view.set_rtt(IDS[spec.who].peer_id, spec.rtt)
    return view


def peer(who: int) -> PeerID:
    return IDS[who].peer_id
