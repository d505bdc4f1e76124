"""Bad input gets a typed error; the server keeps serving everybody else and leaks no page."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import torch

from distllm.errors import Busy, LimitExceeded, RemoteError
from distllm.model import SpanModel
from distllm.protocol import InferenceOpen, InferenceStep
from distllm.server.tensors import to_wire
from distllm.testing import eventually
from distllm.wire.tensors import WireTensor

pytestmark = pytest.mark.anyio

HIDDEN = 64
LIMITS = {
    "cache_tokens": 128,
    "max_sessions": 4,
    "max_batch_size": 4,
    "max_step_tokens": 64,
    "max_request_tokens": 256,
    "max_length": 128,
}


class Witness:
    """A well-behaved session that keeps stepping between the bad requests: its outputs must
    stay exact."""

    def __init__(self, session: Any, span: SpanModel) -> None:
        self.session = session
        self.span = span
        self.x = torch.randn(1, 48, HIDDEN)
        self.position = 0

    async def advance(self) -> None:
        t = self.position
        out = await self.session.step(self.x[:, t : t + 1])
        self.position += 1
        with torch.no_grad():
            expected = self.span(self.x[:, : t + 1])[:, -1:]
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@asynccontextmanager
async def witnessed(
    serve: Callable[..., Any], span: SpanModel, **overrides: Any
) -> AsyncIterator[tuple[Any, Witness]]:
    async with serve("llama", clients=2, **{**LIMITS, **overrides}) as harness:
        async with harness.clients[1].session() as session:
            witness = Witness(session, span)
            await witness.advance()
            yield harness, witness
            await witness.advance()
        await eventually(harness.all_free)


def remote(type_name: str) -> Any:
    return pytest.raises(RemoteError, match=f"^{type_name}: ")


async def test_bad_sessions_are_refused_at_open(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    async with witnessed(serve, local_span("llama")) as (harness, witness):
        client = harness.client
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"model": "other-model"}, remote("WrongSpan")),
            ({"start": 1}, remote("WrongSpan")),  # a sub-span is not served
            ({"end": 5}, remote("WrongSpan")),
            ({"max_length": 1000}, pytest.raises(LimitExceeded, match="max_length")),
            ({"batch_size": 5}, pytest.raises(LimitExceeded, match="batch_size")),
        ]
        for kwargs, expectation in cases:
            with expectation:
                async with client.session(**kwargs):
                    pass
            await witness.advance()
        # not an InferenceOpen first
        async with client.session() as session:
            with remote("RemoteProtocolError"):
                await session.send_unchecked(
                    InferenceOpen("tiny-test-model", 0, 4, 8, 1, b"again", "float32", None)
                )
        await witness.advance()


async def test_bad_steps_end_only_their_session(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    good = torch.randn(1, 2, HIDDEN)
    nan = good.clone()
    nan[0, 1, 5] = float("nan")
    inf = good.clone()
    inf[0, 0, 0] = float("inf")
    hypo = WireTensor.from_numpy(torch.tensor([1]).numpy())
    cases: list[tuple[Callable[[Any], InferenceStep], Any]] = [
        (lambda s: s.make_step(torch.randn(1, 2, HIDDEN + 1)), remote("InvalidTensor")),
        (lambda s: s.make_step(torch.randn(2, 2, HIDDEN)), remote("InvalidTensor")),
        (lambda s: s.make_step(torch.randn(1, 0, HIDDEN)), remote("InvalidTensor")),
        (lambda s: s.make_step(nan), remote("InvalidTensor")),
        (lambda s: s.make_step(inf), remote("InvalidTensor")),
        (lambda s: s.make_step(good, start=5), remote("InvalidPosition")),
        (lambda s: s.make_step(torch.randn(1, 17, HIDDEN)), remote("InvalidPosition")),
        (
            lambda s: InferenceStep(s.make_step(good).hidden, None, hypo, None, 0),
            remote("InvalidTensor"),
        ),
        (
            lambda s: s.make_step(good, prompts=torch.randn(3, 1, 2, HIDDEN)),
            remote("InvalidTensor"),
        ),
        (  # the session carries float32
            lambda s: InferenceStep(to_wire(good, "bfloat16", "none"), None, None, None, 0),
            remote("InvalidTensor"),
        ),
    ]
    async with witnessed(serve, local_span("llama")) as (harness, witness):
        for make, expectation in cases:
            async with harness.client.session(max_length=16) as session:
                await session.step(torch.randn(1, 3, HIDDEN))  # holds a page or so
                with expectation:
                    await session.send_unchecked(make(session))
            await witness.advance()
        # a step larger than max_step_tokens
        async with harness.client.session(max_length=128, batch_size=4) as session:
            with pytest.raises(LimitExceeded, match="max_step_tokens"):
                await session.send_unchecked(session.make_step(torch.randn(4, 17, HIDDEN)))
        await witness.advance()
        # bfloat16 tensors wrongly declared as the session's dtype cannot even be built
        with pytest.raises(ValueError, match="compression"):
            InferenceOpen("m", 0, 4, 8, 1, b"x", "float16", "bfloat16")


async def test_cache_full_and_too_many_sessions_answer_busy(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    async with witnessed(serve, local_span("llama"), max_step_tokens=128) as (harness, witness):
        client = harness.client
        # 128 cache tokens, the witness holds one page: a 126-token prefill cannot fit
        async with client.session(max_length=128) as session:
            with pytest.raises(Busy, match="KV cache full") as busy:
                await session.send_unchecked(session.make_step(torch.randn(1, 126, HIDDEN)))
            assert busy.value.retry_after > 0
        await witness.advance()
        # max_sessions = 4: the witness and three more
        async with (
            client.session() as a,
            client.session() as b,
            client.session() as c,
        ):
            with pytest.raises(Busy, match="sessions are open"):
                async with client.session():
                    pass
            for session in (a, b, c):
                await session.step(torch.randn(1, 2, HIDDEN))
            await witness.advance()
        await eventually(lambda: harness.server.info().sessions == 1)
        async with client.session() as session:  # room again
            await session.step(torch.randn(1, 2, HIDDEN))


async def test_bad_forward_and_backward_requests(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    from distllm.protocol import METHOD_BACKWARD, BackwardRequest

    async with witnessed(serve, local_span("llama")) as (harness, witness):
        client = harness.client
        x = torch.randn(2, 5, HIDDEN)
        with remote("WrongSpan"):
            await client.forward(x, model="nope")
        with remote("WrongSpan"):
            await client.forward(x, start=0, end=3)
        with remote("InvalidTensor"):
            await client.forward(torch.randn(2, 5, HIDDEN - 1))
        with remote("InvalidTensor"):
            await client.forward(torch.full((1, 3, HIDDEN), float("nan")))
        with remote("InvalidTensor"):
            await client.forward(x, prompts=torch.randn(4, 1, 6, HIDDEN))  # longer than x
        with pytest.raises(LimitExceeded, match="max_request_tokens"):
            await client.forward(torch.randn(4, 65, HIDDEN))
        with remote("InvalidTensor"):
            await client.backward(x, torch.randn(2, 4, HIDDEN))
        await witness.advance()
        # a request of the wrong type for the method
        with remote("RemoteProtocolError"):
            await client.rpc.call(
                client.server,
                METHOD_BACKWARD,
                InferenceOpen("m", 0, 4, 8, 1, b"x", "float32", None),
            )
        assert isinstance(BackwardRequest, type)
        # the server still computes correctly
        out = await client.forward(x)
        with torch.no_grad():
            torch.testing.assert_close(out, local_span("llama")(x), atol=1e-4, rtol=1e-4)
        await witness.advance()


async def test_a_step_timeout_and_an_idle_session(
    serve: Callable[..., Any], local_span: Callable[[str], SpanModel]
) -> None:
    from distllm.errors import DeadlineExceeded

    async with serve("llama", session_idle_timeout=0.3) as harness:
        async with harness.client.session() as session:
            await session.step(torch.randn(1, 3, HIDDEN))
            assert harness.server.info().free_cache_tokens < 1024
            await anyio.sleep(0.5)
            with pytest.raises(DeadlineExceeded, match="idle"):
                await session.step(torch.randn(1, 1, HIDDEN))
        await eventually(harness.all_free)
