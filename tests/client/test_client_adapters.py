"""LoRA adapters on the client: routes only through servers that announce the adapter, results
equal local PEFT, failover keeps to those servers, a clear error when nobody serves it."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from client_harness import FAST, SERVER_CONFIG, Harness, swarm_client, tiny_model

from distllm.client import NoRouteError
from distllm.errors import RemoteError
from distllm.protocol.span_messages import ForwardRequest
from distllm.testing.models import hf_blocks, make_tiny_lora

pytestmark = pytest.mark.anyio

HIDDEN = 64
TOL = {"atol": 1e-4, "rtol": 1e-3}


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-models"


@functools.cache
def lora(path: Path) -> Path:
    return make_tiny_lora(path, path.parent / f"{path.name}-lora-a")


@functools.cache
def peft_model(path: Path) -> Any:
    """Local PEFT: the reference. Its own copy of the model (PEFT injects the LoRA layers into
    the model it wraps: the shared ``hf_model`` must stay plain)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, lora(path)).eval()


def with_a(path: Path) -> Any:
    return dataclasses.replace(SERVER_CONFIG, adapters=(("a", lora(path)),))


def peers_with_a(h: Harness) -> set[object]:
    return {s.peer_id for s in h.swarm.servers if "a" in s.server_config.adapter_names}


@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_forward_with_an_adapter_routes_through_its_servers_and_equals_peft(
    root: Path, family: str
):
    path = tiny_model(family, root)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(path)(input_ids=ids).logits
        with peft_model(path).disable_adapter():
            plain = peft_model(path)(input_ids=ids).logits
    # [0, 4) has no adapter and would be the shortest route: only plain requests may use it.
    spans = [(0, 2), (2, 4), (0, 4)]
    async with swarm_client(path, spans, server_configs=[with_a(path), with_a(path), None]) as h:
        model = h.model
        assert {s.peer for s in model.router.view.servers.values() if s.adapters == ("a",)} == (
            peers_with_a(h)
        )
        sent: list[tuple[object, Any]] = []
        original = model.rpc.call

        async def call(address: Any, method: str, request: Any, **kwargs: Any) -> Any:
            sent.append((address.peer_id, request))
            return await original(address, method, request, **kwargs)

        model.rpc.call = call  # type: ignore[method-assign]
        parts = model.parts
        for _ in range(3):  # routes are random draws: every one must avoid [0, 4)
            with torch.no_grad():
                logits = parts.logits(await model.forward(parts.embed(ids), adapter="a"))
            torch.testing.assert_close(logits, expected, **TOL)
        forwards = [(peer, r) for peer, r in sent if isinstance(r, ForwardRequest)]
        assert {peer for peer, _ in forwards} == peers_with_a(h)
        assert all(r.adapter == "a" for _, r in forwards)
        with torch.no_grad():
            logits = parts.logits(await model.forward(parts.embed(ids)))
        torch.testing.assert_close(logits, plain, **TOL)


async def test_backward_with_an_adapter_equals_peft_autograd(root: Path):
    path = tiny_model("llama", root)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, HIDDEN, generator=gen)
    g = torch.randn(1, 5, HIDDEN, generator=gen)
    # Llama's first block takes the embeddings as they are: feed x as inputs_embeds.
    reference = peft_model(path)
    seen: dict[str, torch.Tensor] = {}
    hook = hf_blocks(reference.base_model.model)[-1].register_forward_hook(
        lambda module, args, output: seen.update(
            out=output[0] if isinstance(output, tuple) else output
        )
    )
    leaf = x.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            reference(inputs_embeds=leaf)
            (expected,) = torch.autograd.grad(seen["out"], leaf, g)
    finally:
        hook.remove()
    async with swarm_client(path, [(0, 4), (0, 4)], server_configs=[with_a(path), None]) as h:
        grads = await h.model.backward(x, g, adapter="a")
        torch.testing.assert_close(grads.hidden, expected, **TOL)
        torch.testing.assert_close(
            await h.model.forward(x, adapter="a"), seen["out"].detach(), **TOL
        )


async def test_inference_with_an_adapter_fails_over_only_to_its_servers(root: Path):
    path = tiny_model("llama", root)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(path)(input_ids=ids).logits
    a = with_a(path)
    spans = [(0, 2), (0, 2), (2, 4), (0, 4)]
    async with swarm_client(path, spans, server_configs=[a, a, a, None]) as h:
        model, parts = h.model, h.model.parts
        async with model.inference_session(max_length=16, adapter="a") as session:
            assert {hop.peer for hop in session.route} <= peers_with_a(h)
            assert len(session.route) == 2
            with torch.no_grad():
                out = parts.logits(await session.step(parts.embed(ids[:, :5])))
            torch.testing.assert_close(out, expected[:, :5], **TOL)
            h.black_hole(session.route[0].peer)  # the replacement must be the other [0, 2)
            with torch.no_grad():
                out = parts.logits(await session.step(parts.embed(ids[:, 5:])))
            torch.testing.assert_close(out, expected[:, 5:], **TOL)
            assert session.stats.failovers == 1
            assert {hop.peer for hop in session.route} <= peers_with_a(h)


async def test_no_server_with_the_adapter_is_a_clear_error(root: Path):
    path = tiny_model("llama", root)
    config = dataclasses.replace(FAST, failover_timeout=0.5)
    async with swarm_client(
        path, [(0, 2), (2, 4)], config=config, server_configs=[with_a(path), None]
    ) as h:
        x = torch.randn(1, 3, HIDDEN)
        with pytest.raises(NoRouteError, match=r"blocks 2, 3 of model '[^']+' with adapter 'a'"):
            await h.model.forward(x, adapter="a")
        with pytest.raises(NoRouteError, match="with adapter 'b'"):
            async with h.model.inference_session(max_length=8, adapter="b"):
                pass
        assert not h.model.router.banned()


async def test_a_server_that_does_not_have_its_announced_adapter_is_routed_around(root: Path):
    path = tiny_model("llama", root)
    async with swarm_client(
        path, [(0, 4), (0, 4)], server_configs=[with_a(path), with_a(path)]
    ) as h:
        model = h.model
        original = model.rpc.call
        liar: list[object] = []

        async def call(address: Any, method: str, request: Any, **kwargs: Any) -> Any:
            if isinstance(request, ForwardRequest) and not liar:
                liar.append(address.peer_id)
                raise RemoteError("UnknownAdapter", "this server has no adapter 'a'")
            return await original(address, method, request, **kwargs)

        model.rpc.call = call  # type: ignore[method-assign]
        x = torch.randn(1, 3, HIDDEN)
        out = await model.forward(x, adapter="a")
        assert out.shape == x.shape and model.router.banned() == set(liar)
