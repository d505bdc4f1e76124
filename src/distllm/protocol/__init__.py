"""L1 span protocol: the messages of the span RPCs and the rules of an inference session.

Pure (no IO, no torch): the server and the client both build on it and never on each other.
"""

from __future__ import annotations

from distllm.protocol.errors import InvalidPosition, InvalidTensor, SpanRequestError, WrongSpan
from distllm.protocol.span_checks import (
    SpanShape,
    check_backward,
    check_forward,
    check_hidden,
    check_hypo_ids,
    check_padding,
    check_prompts,
)
from distllm.protocol.span_messages import (
    ACTIVATION_DTYPES,
    METHOD_BACKWARD,
    METHOD_FORWARD,
    METHOD_INFERENCE,
    METHOD_INFO,
    METHOD_RELAY,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
    RelayOpen,
    RelayTarget,
    SpanInfo,
    SpanInfoRequest,
)
from distllm.protocol.span_session import SessionParams, SessionState, SpanSession, StepPlan

__all__ = [
    "ACTIVATION_DTYPES",
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
    "InvalidPosition",
    "InvalidTensor",
    "RelayOpen",
    "RelayTarget",
    "SessionParams",
    "SessionState",
    "SpanInfo",
    "SpanInfoRequest",
    "SpanRequestError",
    "SpanSession",
    "SpanShape",
    "StepPlan",
    "WrongSpan",
    "check_backward",
    "check_forward",
    "check_hidden",
    "check_hypo_ids",
    "check_padding",
    "check_prompts",
]
