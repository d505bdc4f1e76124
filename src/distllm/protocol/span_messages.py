"""Messages of the span RPCs: info, inference sessions, forward and backward (pure, L1).

Methods (``docs/protocol.md`` §8):

* ``span.info`` (unary): :class:`SpanInfoRequest` -> :class:`SpanInfo`.
* ``span.inference`` (stream): :class:`InferenceOpen` -> :class:`InferenceOpened`, then any
  number of :class:`InferenceStep` -> :class:`InferenceOutput`; the caller's end of stream
  closes the session.
* ``span.forward`` (unary): :class:`ForwardRequest` -> :class:`ForwardResponse`.
* ``span.backward`` (unary): :class:`BackwardRequest` -> :class:`BackwardResponse`.
* ``span.relay`` (stream, server to server): :class:`RelayOpen`, then any number of
  :class:`InferenceStep`; nothing comes back. A server whose step carries ``relay`` targets
  sends its output straight on as the next server's step (see :class:`RelayTarget`).

Hidden states are ``[batch, tokens, hidden_size]`` in an activation dtype
(:data:`ACTIVATION_DTYPES`). Deep prompts are ``[num_blocks, batch or 1, prompt_length,
hidden_size]``: before block ``i`` of the span, ``prompts[i]`` is added to the hidden states at
the absolute positions ``0 .. prompt_length-1``. Field values are checked on construction
(``ValueError``; a peer's bad values make decoding raise ``RemoteProtocolError``); tensor shapes
against a session or span are checked by :mod:`distllm.protocol.span_checks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from distllm.wire.messages import message
from distllm.wire.tensors import WireTensor, codecs_for

__all__ = [
    "ACTIVATION_DTYPES",
    "ADAPTER_NAME",
    "MAX_FORWARD_ID",
    "METHOD_BACKWARD",
    "METHOD_FORWARD",
    "METHOD_INFERENCE",
    "METHOD_INFO",
    "METHOD_RELAY",
    "BackwardRequest",
    "BackwardResponse",
    "ForwardRequest",
    "ForwardResponse",
    "InferenceOpen",
    "InferenceOpened",
    "InferenceOutput",
    "InferenceStep",
    "RelayOpen",
    "RelayTarget",
    "SpanInfo",
    "SpanInfoRequest",
]

METHOD_INFO: Final = "span.info"
METHOD_INFERENCE: Final = "span.inference"
METHOD_FORWARD: Final = "span.forward"
METHOD_BACKWARD: Final = "span.backward"
METHOD_RELAY: Final = "span.relay"

#: dtypes hidden states, prompts and gradients may travel in.
ACTIVATION_DTYPES: Final[tuple[str, ...]] = ("float32", "bfloat16", "float16")
#: Longest model name (as in the DHT records).
MAX_MODEL_NAME: Final = 256
#: Length of a client's session id, in bytes.
MAX_SESSION_ID: Final = 64
#: Length of a caller's forward id (a forward whose autograd graph a backward may reuse).
MAX_FORWARD_ID: Final = 32
#: Most servers a step may be relayed through after the one it is sent to.
MAX_RELAY_TARGETS: Final = 64
#: Longest peer address in a relay target.
MAX_RELAY_ADDRESS: Final = 512
#: Adapter names: 1..64 characters of letters, digits, ``_``, ``-`` and ``.``.
ADAPTER_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _check(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


def _check_target(model: str, start: int, end: int) -> None:
    _check(0 < len(model) <= MAX_MODEL_NAME, "model", f"1..{MAX_MODEL_NAME} characters", model)
    _check(start >= 0, "start", ">= 0", start)
    _check(end > start, "end", "> start", end)


def _check_dtype(field: str, dtype: str) -> None:
    _check(dtype in ACTIVATION_DTYPES, field, f"one of {ACTIVATION_DTYPES}", dtype)


def _check_adapter(adapter: str | None) -> None:
    _check(
        adapter is None or ADAPTER_NAME.fullmatch(adapter) is not None,
        "adapter",
        "None or 1..64 characters of [A-Za-z0-9_.-]",
        adapter,
    )


def _check_session_id(session_id: bytes) -> None:
    _check(
        0 < len(session_id) <= MAX_SESSION_ID,
        "session_id",
        f"1..{MAX_SESSION_ID} bytes",
        session_id,
    )


def _check_step(step_id: int, output_tail: int | None) -> None:
    _check(step_id >= 0, "step_id", ">= 0", step_id)
    _check(output_tail is None or output_tail >= 0, "output_tail", "None or >= 0", output_tail)


def _check_forward_id(forward_id: bytes | None) -> None:
    _check(
        forward_id is None or 0 < len(forward_id) <= MAX_FORWARD_ID,
        "forward_id",
        f"None or 1..{MAX_FORWARD_ID} bytes",
        forward_id,
    )


def _check_codec(compression: str | None, dtype: str) -> None:
    allowed = codecs_for(dtype)
    _check(
        compression is None or compression in allowed,
        "compression",
        f"None or one of {allowed} for {dtype}",
        compression,
    )


@message("span.info.request")
@dataclass(frozen=True, slots=True)
class SpanInfoRequest:
    """Ask a server what it holds and how loaded it is; with ``session_id``, also how far that
    inference session got (a client waiting for a relayed step asks whether it arrived)."""

    session_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.session_id is not None:
            _check_session_id(self.session_id)


@message("span.info")
@dataclass(frozen=True, slots=True)
class SpanInfo:
    """What a server holds, and its load right now."""

    model: str
    start: int  # first block served
    end: int  # one past the last block served
    dtype: str  # dtype of the weights and the KV cache ("float32", "bfloat16", ...)
    hidden_size: int
    version: str  # distllm version
    free_cache_tokens: int  # tokens sessions can still grow by
    total_cache_tokens: int
    page_size: int  # tokens per KV page (memory is taken in these steps)
    sessions: int  # inference sessions open now
    max_sessions: int
    queued_items: int  # steps and requests waiting for the compute thread
    queued_tokens: int
    max_length: int  # longest session a client may open
    max_batch_size: int  # most rows per session
    inference_rps: float | None  # measured throughput (tokens/s per block), None: unknown
    forward_rps: float | None
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters it loaded
    #: With a request's ``session_id``: the id of the last step that session received (sent
    #: or relayed; -1: none yet); ``None``: no such session here, or none asked about.
    session_step: int | None = None


@message("span.inference.open")
@dataclass(frozen=True, slots=True)
class InferenceOpen:
    """First message of a ``span.inference`` stream: the session the caller wants."""

    model: str
    start: int
    end: int
    max_length: int  # positions the session may reach (prompt and generated tokens)
    batch_size: int  # rows (e.g. beams); every step carries all of them
    session_id: bytes  # the caller's name for the session, 1..64 bytes (echoed, logged)
    dtype: str  # activation dtype of the hidden states (and prompts), both ways
    compression: str | None  # codec of the outputs; None: the server's default
    adapter: str | None = None  # a LoRA adapter the server loaded; None: the plain blocks

    def __post_init__(self) -> None:
        _check_target(self.model, self.start, self.end)
        _check_adapter(self.adapter)
        _check(self.max_length >= 1, "max_length", ">= 1", self.max_length)
        _check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _check_session_id(self.session_id)
        _check_dtype("dtype", self.dtype)
        _check_codec(self.compression, self.dtype)


@message("span.inference.opened")
@dataclass(frozen=True, slots=True)
class InferenceOpened:
    """The server's answer to :class:`InferenceOpen`: the session exists at position 0."""

    session_id: bytes
    max_length: int
    batch_size: int
    hidden_size: int
    num_blocks: int
    dtype: str  # activation dtype, as asked
    compression: str  # the codec the outputs will use


@message("span.relay.target")
@dataclass(frozen=True, slots=True)
class RelayTarget:
    """The next server a step's output goes to, as that server's step (``span.relay``).

    The relaying server sends its full output as the ``hidden`` of an :class:`InferenceStep`
    with the step's own ``start_from_position``, ``hypo_ids`` and ``padding``, this target's
    ``step_id``, ``prompts`` and ``output_tail``, and the step's remaining targets -- to the
    session ``session_id`` of the server at ``address``, which computes it as if its caller
    had sent it, and answers its caller as usual. Relayed steps must have increasing
    ``step_id``s: one whose id is not above the last step the session received is stale and
    dropped.
    """

    address: str  # the next server's peer address (``distllm://<peer-id>@host:port``)
    session_id: bytes  # the caller's session there
    step_id: int
    prompts: WireTensor | None = None  # that span's deep prompts
    output_tail: int | None = None

    def __post_init__(self) -> None:
        _check(
            0 < len(self.address) <= MAX_RELAY_ADDRESS,
            "address",
            f"1..{MAX_RELAY_ADDRESS} characters",
            self.address[:80],
        )
        _check_session_id(self.session_id)
        _check_step(self.step_id, self.output_tail)


@message("span.relay.open")
@dataclass(frozen=True, slots=True)
class RelayOpen:
    """First message of a ``span.relay`` stream: the session its steps are for."""

    session_id: bytes

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)


@message("span.inference.step")
@dataclass(frozen=True, slots=True)
class InferenceStep:
    """Hidden states of ``n`` new tokens for every row, ``[batch_size, n, hidden_size]``.

    ``start_from_position`` (default: the session's position) may roll the session back: the
    new tokens take positions ``start .. start+n-1`` and everything after is forgotten.
    ``hypo_ids`` (int64 ``[batch_size]``) reorders the rows' caches first: row ``i`` continues
    from what row ``hypo_ids[i]`` held (beam search). ``prompts``: deep prompts (module doc).
    ``padding`` (one count per row): row ``r``'s first ``padding[r]`` session positions are
    left padding -- not computed, not cached, zeros in the output; its token at session
    position ``q`` sits at position ``q - padding[r]`` of its own sequence. A step from position
    0 may set it; later steps repeat it or send ``None`` (:mod:`distllm.protocol.span_session`).
    """

    hidden: WireTensor
    start_from_position: int | None
    hypo_ids: WireTensor | None
    prompts: WireTensor | None
    step_id: int  # chosen by the caller, echoed in the output
    padding: tuple[int, ...] | None = None  # leading pad tokens per row; None: unchanged
    #: Outputs of only each row's last ``output_tail`` new tokens come back (0: none, e.g. a
    #: replay that only rebuilds the cache); ``None``: all of them.
    output_tail: int | None = None
    #: Servers the output goes on to, first one first (:class:`RelayTarget`); empty: none.
    relay: tuple[RelayTarget, ...] = ()

    def __post_init__(self) -> None:
        _check(
            self.start_from_position is None or self.start_from_position >= 0,
            "start_from_position",
            "None or >= 0",
            self.start_from_position,
        )
        _check_step(self.step_id, self.output_tail)
        _check(
            self.padding is None or (len(self.padding) > 0 and min(self.padding) >= 0),
            "padding",
            "None or a non-empty tuple of counts >= 0",
            self.padding,
        )
        _check(
            len(self.relay) <= MAX_RELAY_TARGETS,
            "relay",
            f"at most {MAX_RELAY_TARGETS} targets",
            len(self.relay),
        )
        # A relayed output goes on whole: it is the next span's input.
        _check(
            not self.relay or self.output_tail is None,
            "output_tail",
            "None in a step with relay targets",
            self.output_tail,
        )


@message("span.inference.output")
@dataclass(frozen=True, slots=True)
class InferenceOutput:
    """The span's output for a step's tokens, ``[batch_size, n, hidden_size]``."""

    hidden: WireTensor
    position: int  # the session's position after the step
    step_id: int
    #: For a step with ``relay`` targets: ``True`` once the output went to the first one,
    #: ``False`` if it could not (the caller sends that step itself); ``None``: no targets.
    relayed: bool | None = None


@message("span.forward.request")
@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """Run the span over ``hidden`` ``[b, T, hidden_size]`` causally from position 0.

    ``forward_id`` (chosen by the caller) asks the server to keep this forward's autograd graph
    for a backward that names it, sparing the backward a recomputation. The server may decline
    or drop it at any time (memory, age); the backward then recomputes from its ``hidden``.
    """

    model: str
    start: int
    end: int
    hidden: WireTensor
    prompts: WireTensor | None
    compression: str | None  # codec of the output; None: the server's default
    adapter: str | None = None  # a LoRA adapter the server loaded; None: the plain blocks
    forward_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_target(self.model, self.start, self.end)
        _check_adapter(self.adapter)
        _check_forward_id(self.forward_id)
        _check_dtype("hidden.dtype", self.hidden.dtype)
        _check_codec(self.compression, self.hidden.dtype)


@message("span.forward.response")
@dataclass(frozen=True, slots=True)
class ForwardResponse:
    hidden: WireTensor  # [b, T, hidden_size], in the request's dtype


@message("span.backward.request")
@dataclass(frozen=True, slots=True)
class BackwardRequest:
    """Gradients of the span w.r.t. its inputs (and prompts), given those of its outputs.

    The server recomputes the forward over ``hidden`` under autograd (weights stay frozen), or
    reuses the graph it kept for the caller's forward ``forward_id``. A ``forward_id`` the
    server never saw from this caller is refused (``UnknownForward``); one it saw but no
    longer keeps is recomputed. ``hidden``, ``prompts`` and ``adapter`` must be the forward's.
    """

    model: str
    start: int
    end: int
    hidden: WireTensor  # the span's inputs [b, T, hidden_size]
    grad_output: WireTensor  # d(loss)/d(outputs), same shape and dtype
    prompts: WireTensor | None
    compression: str | None
    adapter: str | None = None
    forward_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_target(self.model, self.start, self.end)
        _check_adapter(self.adapter)
        _check_forward_id(self.forward_id)
        _check_dtype("hidden.dtype", self.hidden.dtype)
        _check_codec(self.compression, self.hidden.dtype)


@message("span.backward.response")
@dataclass(frozen=True, slots=True)
class BackwardResponse:
    grad_inputs: WireTensor  # [b, T, hidden_size]
    grad_prompts: WireTensor | None  # shaped like the request's prompts; None without them
