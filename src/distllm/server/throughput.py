"""How fast this server computes, measured once per (model, span size, dtype, machine) and cached.

Clients route by these numbers (see ``dht.schema.ServerRecord``):

* ``inference_rps`` — single-token decode steps per second *per block*: the span's measured decode
  step rate times its number of blocks (a block takes 1/n of a span step).
* ``forward_rps`` — tokens per second per block for a stateless forward of a 128-token sequence.
* ``throughput`` — what a server announces for placement: the inference rate, capped by the
  network when the operator gives a bandwidth (a hop moves one hidden state per token).

Measuring takes a few seconds of compute, so results are cached in a JSON file keyed by everything
that changes them; a restart on the same machine reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distllm.model import PagedKVCache, SpanModel, StepInput

__all__ = ["Throughput", "default_cache_file", "measure_throughput"]

logger = logging.getLogger("distllm.server.throughput")

_FORWARD_TOKENS = 128
_PREFIX_TOKENS = 32


@dataclass(frozen=True, slots=True)
class Throughput:
    inference_rps: float
    forward_rps: float
    throughput: float


def default_cache_file() -> Path:
    root = os.environ.get("DISTLLM_CACHE") or Path.home() / ".cache" / "distllm"
    return Path(root) / "throughput.json"


def measure_throughput(
    span: SpanModel,
    *,
    network_mbps: float | None = None,
    cache_file: Path | None = None,
    steps: int = 8,
) -> Throughput:
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps!r}")
    """Measure (or load from the cache) the span's rates. Runs torch: call it off the event loop."""
    cache_file = cache_file or default_cache_file()
    key = _cache_key(span)
    cached = _read_cache(cache_file).get(key)
    if cached is not None:
        inference_rps, forward_rps = float(cached["inference_rps"]), float(cached["forward_rps"])
    else:
        inference_rps = _decode_rate(span, steps) * span.num_blocks
        forward_rps = _forward_rate(span) * span.num_blocks
        _write_cache(cache_file, key, {"inference_rps": inference_rps, "forward_rps": forward_rps})
        logger.info(
            "measured %.1f decode steps/s and %.0f tokens/s per block",
            inference_rps,
            forward_rps,
        )
    throughput = inference_rps
    if network_mbps is not None:
        bytes_per_token = span.hidden_size * 2  # activations travel as 16-bit floats by default
        throughput = min(throughput, network_mbps * 1e6 / 8 / bytes_per_token)
    return Throughput(inference_rps, forward_rps, throughput)


def _decode_rate(span: SpanModel, steps: int) -> float:
    pages = (_PREFIX_TOKENS + steps) // 16 + 2
    cache = PagedKVCache(span, num_pages=pages, page_size=16)
    session = "throughput-probe"
    cache.open(session)
    try:
        hidden = torch.randn(_PREFIX_TOKENS + steps, span.hidden_size, dtype=span.dtype)
        with torch.inference_mode():
            span.step(cache, [StepInput(session, hidden[:_PREFIX_TOKENS], 0)])
            begin = 0.0
            for i in range(steps):  # the first step warms up and is not timed
                if i == 1:
                    begin = time.perf_counter()
                position = _PREFIX_TOKENS + i
                span.step(cache, [StepInput(session, hidden[position : position + 1], position)])
            elapsed = time.perf_counter() - begin
    finally:
        cache.close(session)
    return (steps - 1) / max(elapsed, 1e-9)


def _forward_rate(span: SpanModel) -> float:
    hidden = torch.randn(1, _FORWARD_TOKENS, span.hidden_size, dtype=span.dtype)
    with torch.inference_mode():
        span.forward(hidden)  # warm-up
        begin = time.perf_counter()
        span.forward(hidden)
        elapsed = time.perf_counter() - begin
    return _FORWARD_TOKENS / max(elapsed, 1e-9)


def _cache_key(span: SpanModel) -> str:
    config_json = json.dumps(span.config.to_dict(), sort_keys=True, default=str)
    parts = [
        hashlib.sha256(config_json.encode()).hexdigest()[:16],
        f"blocks={span.num_blocks}",
        f"dtype={span.dtype}",
        f"device={span.device}",
        f"threads={torch.get_num_threads()}",
        f"torch={torch.__version__}",
        f"cpu={platform.processor() or platform.machine()}",
    ]
    return "|".join(parts)


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, value: dict[str, float]) -> None:
    data = _read_cache(path)
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not stop a server from starting
        logger.warning("could not cache throughput in %s: %s", path, exc)
