"""The span session state machine and the span messages (pure)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distllm.errors import LocalProtocolError, RemoteProtocolError
from distllm.protocol import (
    InferenceOpen,
    InferenceOutput,
    InferenceStep,
    InvalidPosition,
    InvalidTensor,
    SessionParams,
    SessionState,
    SpanSession,
    SpanShape,
)
from distllm.wire import decode_message, encode_message
from distllm.wire.tensors import WireTensor

SHAPE = SpanShape(num_blocks=2, hidden_size=8)


def params(max_length: int = 16, batch_size: int = 2, dtype: str = "float32") -> SessionParams:
    return SessionParams(max_length, batch_size, dtype, SHAPE)


def hidden(rows: int, n: int, width: int = 8, dtype: type = np.float32) -> WireTensor:
    return WireTensor.from_numpy(np.zeros((rows, n, width), dtype=dtype))


def step(n: int, start: int | None = None, rows: int = 2, **kwargs: object) -> InferenceStep:
    fields: dict[str, object] = {"hypo_ids": None, "prompts": None, "step_id": 0, **kwargs}
    return InferenceStep(hidden(rows, n), start, **fields)  # type: ignore[arg-type]


def output(plan_end: int, n: int, rows: int = 2, step_id: int = 0) -> InferenceOutput:
    return InferenceOutput(hidden(rows, n), plan_end, step_id)


def test_steps_advance_roll_back_and_reorder() -> None:
    session = SpanSession(params())
    plan = session.receive_step(step(5))
    assert (plan.start, plan.end, plan.total_tokens, plan.hypo_ids) == (0, 5, 10, None)
    session.complete_step(plan)
    plan = session.receive_step(step(2, start=3, hypo_ids=WireTensor.from_numpy(np.array([1, 1]))))
    assert (plan.start, plan.end, plan.hypo_ids) == (3, 5, (1, 1))
    session.complete_step(plan)
    identity = WireTensor.from_numpy(np.array([0, 1]))
    plan = session.receive_step(step(1, hypo_ids=identity))
    assert plan.hypo_ids is None  # nothing to reorder
    session.complete_step(plan)
    assert session.position == 6
    session.close()
    assert session.state is SessionState.CLOSED


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (step(17), InvalidPosition, "max_length"),
        (step(1, start=1), InvalidPosition, "beyond"),
        (step(1, rows=3), InvalidTensor, r"expected \[2, n>=1, 8\]"),
        (step(0), InvalidTensor, "n>=1"),
        (InferenceStep(hidden(2, 1, width=9), None, None, None, 0), InvalidTensor, "8"),
        (
            InferenceStep(hidden(2, 1, dtype=np.float16), None, None, None, 0),
            InvalidTensor,
            "dtype",
        ),
        (step(1, hypo_ids=WireTensor.from_numpy(np.array([0, 2]))), InvalidTensor, "0..1"),
        (
            step(1, hypo_ids=WireTensor.from_numpy(np.array([0, 1], np.int32))),
            InvalidTensor,
            "int64",
        ),
        (
            step(1, prompts=WireTensor.from_numpy(np.zeros((3, 1, 2, 8), np.float32))),
            InvalidTensor,
            "prompts",
        ),
        (
            step(1, prompts=WireTensor.from_numpy(np.zeros((2, 1, 17, 8), np.float32))),
            InvalidTensor,
            "prompts",
        ),
    ],
)
def test_a_broken_rule_is_the_peers_fault_on_the_server(
    message: InferenceStep, error: type[Exception], match: str
) -> None:
    session = SpanSession(params())
    with pytest.raises(error, match=match):
        session.receive_step(message)
    assert session.state is SessionState.ERROR
    with pytest.raises(LocalProtocolError):
        session.receive_step(step(1))


def test_the_client_side_raises_local_errors_and_checks_outputs() -> None:
    session = SpanSession(params())
    with pytest.raises(LocalProtocolError, match="max_length"):
        session.send_step(step(17))
    assert session.state is SessionState.OPEN  # nothing was sent
    session.send_step(step(4, step_id=7))
    with pytest.raises(LocalProtocolError, match="in flight"):
        session.send_step(step(1))
    session.receive_output(output(4, 4, step_id=7))
    assert session.position == 4
    session.send_step(step(1, step_id=8))
    with pytest.raises(RemoteProtocolError, match="position"):
        session.receive_output(output(9, 1, step_id=8))
    assert session.state is SessionState.ERROR


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), max_size=20))
def test_positions_follow_the_rules(steps: list[tuple[int, int]]) -> None:
    """Against a direct model: a step is valid iff start <= position and end <= max_length."""
    session = SpanSession(params(max_length=16, batch_size=1))
    position = 0
    for start, n in steps:
        valid = start <= position and start + n <= 16
        if not valid:
            with pytest.raises(InvalidPosition):
                session.receive_step(step(n, start=start, rows=1))
            return
        session.complete_step(session.receive_step(step(n, start=start, rows=1)))
        position = start + n
        assert session.position == position


def test_messages_round_trip_and_reject_bad_values() -> None:
    opening = InferenceOpen("m", 0, 4, 32, 2, b"id", "bfloat16", "int8_blockwise")
    assert decode_message(b"".join(bytes(p) for p in encode_message(opening))) == opening
    for kwargs, match in [
        ({"end": 0}, "end"),
        ({"max_length": 0}, "max_length"),
        ({"session_id": b""}, "session_id"),
        ({"dtype": "int64"}, "dtype"),
        ({"compression": "float16"}, "compression"),  # not for bfloat16
    ]:
        with pytest.raises(ValueError, match=match):
            replace(opening, **kwargs)
