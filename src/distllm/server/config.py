"""Settings of a span server. Invalid values raise ``ValueError``:
``"<field> must be <rule>, got <value>"``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distllm.protocol.span_messages import ADAPTER_NAME
from distllm.wire.codecs import CODECS

__all__ = ["MAX_ADAPTERS", "QUANTIZATIONS", "WEIGHT_DTYPES", "ServerConfig"]

#: dtypes a span's weights and KV cache may be held in.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
#: Weight quantizations (``distllm.model.quantize.QUANT_MODES``; kept here so that reading a
#: config does not import torch).
QUANTIZATIONS = ("none", "int8", "nf4")
#: Most LoRA adapters one server may load (what a DHT announcement carries).
MAX_ADAPTERS = 64


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a server holds its span and what it lets clients do."""

    #: dtype of the weights and of the KV cache.
    dtype: str = "float32"
    #: Weight quantization of the span's linear layers through bitsandbytes (``pip install
    #: distllm[quant]``): ``"none"``, ``"int8"`` (LLM.int8()) or ``"nf4"`` (4-bit NormalFloat;
    #: needs layer sizes bitsandbytes' CPU kernel takes, checked on load). Computed in ``dtype``.
    quant: str = "none"
    #: KV cache size in tokens (per block of the span; every session row's tokens count).
    cache_tokens: int = 8192
    #: A memory budget for the KV cache in bytes; when set it replaces ``cache_tokens``.
    cache_bytes: int | None = None
    #: Tokens per KV page: sessions take memory in steps of this many tokens.
    page_size: int = 16
    #: Longest session (``max_length``) a client may open.
    max_length: int = 8192
    #: Most rows (beams) one session may have.
    max_batch_size: int = 64
    #: Most token positions (rows x new tokens) one inference step may carry.
    max_step_tokens: int = 8192
    #: Most token positions (batch x length) one forward or backward request may carry.
    max_request_tokens: int = 65536
    #: Most token positions computed in one batched forward of inference work.
    max_batch_tokens: int = 2048
    #: Most tokens of one prefill per batch: a long prompt advances a chunk at a time.
    prefill_chunk_tokens: int = 512
    #: Most sessions whose steps run in one forward; ``None``: no limit. 1 runs every session's
    #: step alone, one at a time (how Petals schedules; for comparisons).
    max_batch_sessions: int | None = None
    #: Seconds the compute loop may wait, before a batch, for the steps of sessions that just
    #: got their previous output (so that they join the batch); 0 never waits.
    batch_window: float = 0.002
    #: Steps and requests that may wait for compute; more are refused with ``Busy``.
    max_queued_items: int = 1024
    #: Token positions that may wait for compute; more are refused with ``Busy``.
    max_queued_tokens: int = 1 << 20
    #: Seconds a forward/backward may be held back by inference before it goes first anyway.
    max_training_wait: float = 5.0
    #: Most inference sessions open at once; more are refused with ``Busy``.
    max_sessions: int = 4096
    #: A session that sends nothing for this many seconds is closed (``DeadlineExceeded``).
    session_idle_timeout: float = 60.0
    #: Most seconds a step or request may take to be computed (queueing included), and to be
    #: sent back; beyond, the call fails with ``DeadlineExceeded``.
    step_timeout: float = 30.0
    #: Most seconds a server may spend relaying a step's output to the next server (opening
    #: the ``span.relay`` stream, when needed, and sending the step); beyond, it gives up and
    #: answers ``relayed=False`` (the client then sends that step itself).
    relay_timeout: float = 0.5
    #: torch threads of the compute thread's operations; ``None`` leaves torch's default.
    num_threads: int | None = None
    #: Codec of outputs when a client asks for none in particular.
    compression: str = "none"
    #: Reserve ``max_length x batch_size`` cache tokens when a session opens, refusing sessions
    #: beyond the cache (how Petals admits; for comparisons). Off: pages are taken as sessions
    #: grow.
    reserve_max_length: bool = False
    #: Reject inputs holding NaN or infinities.
    check_finite: bool = True
    #: LoRA adapters to load: ``(name, directory)`` pairs, each directory a PEFT checkpoint
    #: (``adapter_config.json`` + ``adapter_model.safetensors``). Clients pick one by name per
    #: session or request. Checked against the span when the server starts.
    adapters: tuple[tuple[str, Path], ...] = ()
    #: Memory budget, in bytes, of the autograd graphs kept for forwards that asked for it
    #: (``forward_id``), so that their backward need not recompute them. The least recently
    #: kept go first beyond it; a forward whose graph alone exceeds it is not kept. 0: none.
    kept_graph_bytes: int = 1 << 30
    #: Seconds a kept graph waits for its backward before it is dropped.
    kept_graph_ttl: float = 60.0

    def __post_init__(self) -> None:
        _require(self.dtype in WEIGHT_DTYPES, "dtype", f"one of {WEIGHT_DTYPES}", self.dtype)
        _require(self.quant in QUANTIZATIONS, "quant", f"one of {QUANTIZATIONS}", self.quant)
        _require(self.page_size >= 1, "page_size", ">= 1", self.page_size)
        _require(
            self.cache_tokens >= self.page_size,
            "cache_tokens",
            ">= page_size",
            self.cache_tokens,
        )
        _require(
            self.cache_bytes is None or self.cache_bytes > 0,
            "cache_bytes",
            "None or > 0",
            self.cache_bytes,
        )
        for name in ("max_length", "max_batch_size", "max_step_tokens", "max_request_tokens"):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _require(self.max_batch_tokens >= 1, "max_batch_tokens", ">= 1", self.max_batch_tokens)
        _require(
            1 <= self.prefill_chunk_tokens <= self.max_batch_tokens,
            "prefill_chunk_tokens",
            "in 1..max_batch_tokens",
            self.prefill_chunk_tokens,
        )
        _require(
            self.max_batch_sessions is None or self.max_batch_sessions >= 1,
            "max_batch_sessions",
            "None or >= 1",
            self.max_batch_sessions,
        )
        _require(self.batch_window >= 0, "batch_window", ">= 0", self.batch_window)
        _require(self.max_queued_items >= 1, "max_queued_items", ">= 1", self.max_queued_items)
        _require(
            self.max_queued_tokens >= max(self.max_step_tokens, self.max_request_tokens),
            "max_queued_tokens",
            ">= max_step_tokens and >= max_request_tokens",
            self.max_queued_tokens,
        )
        _require(self.max_training_wait >= 0, "max_training_wait", ">= 0", self.max_training_wait)
        _require(self.max_sessions >= 1, "max_sessions", ">= 1", self.max_sessions)
        _require(
            self.session_idle_timeout > 0,
            "session_idle_timeout",
            "> 0",
            self.session_idle_timeout,
        )
        _require(self.step_timeout > 0, "step_timeout", "> 0", self.step_timeout)
        _require(self.relay_timeout > 0, "relay_timeout", "> 0", self.relay_timeout)
        _require(
            self.num_threads is None or self.num_threads >= 1,
            "num_threads",
            "None or >= 1",
            self.num_threads,
        )
        _require(self.compression in CODECS, "compression", f"one of {CODECS}", self.compression)
        adapters = tuple((name, Path(path)) for name, path in self.adapters)
        object.__setattr__(self, "adapters", adapters)  # frozen: normalise str paths once
        names = [name for name, _ in adapters]
        _require(
            len(names) <= MAX_ADAPTERS
            and all(ADAPTER_NAME.fullmatch(name) for name in names)
            and len(set(names)) == len(names),
            "adapters",
            f"at most {MAX_ADAPTERS} (name, path) pairs with distinct names of 1..64 "
            "characters of [A-Za-z0-9_.-]",
            self.adapters,
        )
        _require(self.kept_graph_bytes >= 0, "kept_graph_bytes", ">= 0", self.kept_graph_bytes)
        _require(self.kept_graph_ttl > 0, "kept_graph_ttl", "> 0", self.kept_graph_ttl)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of the adapters, in the order given."""
        return tuple(name for name, _ in self.adapters)
