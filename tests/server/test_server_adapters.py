"""LoRA adapters: what a server computes with an adapter equals PEFT's own model (forward,
backward, inference steps -- also batched with other adapters' sessions); bad adapters fail the
start, unknown names are refused, and the server announces what it loaded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from distllm.errors import RemoteError
from distllm.model import PagedKVCache, load_span
from distllm.model.adapters import InvalidAdapter, load_adapters
from distllm.protocol import (
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
)
from distllm.server.backend import SpanBackend
from distllm.server.jobs import InferenceJob
from distllm.server.scheduler import Chunk
from distllm.server.tensors import from_wire, to_wire
from distllm.testing.models import hf_blocks, make_tiny_lora
from distllm.wire.tensors import WireTensor

HIDDEN = 64
BLOCKS = 4
MODEL = "tiny-test-model"
TOL = {"atol": 1e-4, "rtol": 1e-3}


# -- adapters and the PEFT reference -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Callable[[str], Path]
) -> Callable[[str, str], Path]:
    """``lora(family, name)``: "alpha" (r=4, every projection), "beta" (r=2, attention only),
    "gamma" (alpha's weights with rsLoRA scaling)."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, name: str) -> Path:
        if (family, name) not in made:
            root = tmp_path_factory.mktemp(f"{family}-{name}")
            if name == "alpha":
                path = make_tiny_lora(checkpoint(family), root, r=4, seed=1)
            elif name == "beta":
                targets = ["q_proj", "v_proj"] if family == "llama" else ["query_key_value"]
                path = make_tiny_lora(checkpoint(family), root, r=2, seed=2, target_modules=targets)
            else:
                path = root / "gamma"
                shutil.copytree(get(family, "alpha"), path)
                edit_config(path, use_rslora=True)
            made[family, name] = path
        return made[family, name]

    return get


def edit_config(path: Path, **changes: Any) -> None:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def adapters_config(lora: Callable[[str, str], Path], family: str) -> dict[str, Any]:
    return {"adapters": tuple((name, lora(family, name)) for name in ("alpha", "beta", "gamma"))}


def peft_model(checkpoint: Path, adapter: Path | None) -> Any:
    """The transformers model, with the adapter injected by PEFT itself (or none)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if adapter is not None:
        PeftModel.from_pretrained(model, adapter)  # injects into ``model`` in place
    return model.requires_grad_(False).eval()


def peft_blocks(
    model: Any, input_ids: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the model: the blocks' input, their output, and d(output . grad_output)/d(input)."""
    blocks = hf_blocks(model)
    seen: dict[str, torch.Tensor] = {}

    def before(module: Any, args: Any, kwargs: Any) -> Any:
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        seen["input"] = x
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        seen["output"] = output[0] if isinstance(output, tuple) else output

    hooks = [
        blocks[0].register_forward_pre_hook(before, with_kwargs=True),
        blocks[BLOCKS - 1].register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with torch.enable_grad():
            model(input_ids=input_ids)
            (grad,) = torch.autograd.grad(seen["output"], seen["input"], grad_output)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["input"].detach(), seen["output"].detach(), grad


# -- forward, backward, inference against PEFT -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_forward_and_backward_match_peft(
    family: str,
    serve: Callable[..., Any],
    checkpoint: Callable[[str], Path],
    lora: Callable[[str, str], Path],
) -> None:
    input_ids = torch.randint(4, 100, (2, 7))
    grad_output = torch.randn(2, 7, HIDDEN)
    async with serve(family, **adapters_config(lora, family)) as harness:
        for adapter in ("alpha", "gamma", None, "beta"):
            model = peft_model(
                checkpoint(family), None if adapter is None else lora(family, adapter)
            )
            x, expected, expected_grad = peft_blocks(model, input_ids, grad_output)
            out = await harness.client.forward(x, adapter=adapter)
            grad, _ = await harness.client.backward(x, grad_output, adapter=adapter)
            torch.testing.assert_close(out, expected, **TOL)
            torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["llama", "bloom"])
async def test_sessions_of_different_adapters_step_together_exactly(
    family: str,
    serve: Callable[..., Any],
    checkpoint: Callable[[str], Path],
    lora: Callable[[str, str], Path],
) -> None:
    adapters = ["alpha", None, "beta", "alpha"]
    input_ids = torch.randint(4, 100, (1, 9))
    expected = {}
    for adapter in set(adapters):
        model = peft_model(checkpoint(family), None if adapter is None else lora(family, adapter))
        expected[adapter] = peft_blocks(model, input_ids, torch.zeros(1, 9, HIDDEN))[:2]
    results: list[torch.Tensor | None] = [None] * len(adapters)
    config = {**adapters_config(lora, family), "batch_window": 0.05}
    async with serve(family, clients=len(adapters), **config) as harness:

        async def run(i: int) -> None:
            client, adapter = harness.clients[i], adapters[i]
            x = expected[adapter][0]
            async with client.rpc.open_stream(client.server, "span.inference", timeout=60) as s:
                opening = InferenceOpen(MODEL, 0, BLOCKS, 16, 1, b"s%d" % i, "float32", None)
                await s.send(replace(opening, adapter=adapter))
                await s.receive_as(InferenceOpened)
                outputs = []
                for step, (begin, end) in enumerate([(0, 4), *((t, t + 1) for t in range(4, 9))]):
                    await s.send(
                        InferenceStep(
                            to_wire(x[:, begin:end], "float32", "none"), None, None, None, step
                        )
                    )
                    with anyio.fail_after(30):
                        reply = await s.receive_as(InferenceOutput)
                    outputs.append(from_wire(reply.hidden).clone())
            results[i] = torch.cat(outputs, dim=1)

        async with anyio.create_task_group() as tg:
            for i in range(len(adapters)):
                tg.start_soon(run, i)
        stats = harness.server.compute.stats
        assert stats.batches < stats.inference_chunks  # sessions shared scheduler batches
    for adapter, out in zip(adapters, results, strict=True):
        assert out is not None
        torch.testing.assert_close(out, expected[adapter][1], **TOL)


def test_one_batch_of_mixed_adapters_runs_one_step_per_adapter(
    checkpoint: Callable[[str], Path], lora: Callable[[str, str], Path]
) -> None:
    from distllm.protocol import SessionParams, SpanSession, SpanShape

    span = load_span(checkpoint("llama"), 0, BLOCKS)
    adapters = load_adapters(span, [(n, lora("llama", n)) for n in ("alpha", "beta")])
    backend = SpanBackend(span, PagedKVCache(span, 64, 4), adapters=adapters)
    names = ["alpha", None, "beta", "alpha", None]
    inputs = [torch.randn(1, 5 + i, HIDDEN) for i in range(len(names))]

    def job(key: int, adapter: str | None, x: torch.Tensor) -> tuple[InferenceJob, Chunk]:
        step = InferenceStep(WireTensor.from_numpy(x.numpy()), 0, None, None, key)
        machine = SpanSession(SessionParams(64, 1, "float32", SpanShape(BLOCKS, HIDDEN)))
        plan = machine.receive_step(step)
        item = InferenceJob(key, f"s{key}", step, plan, "float32", "none", adapter)
        return item, Chunk(item.work_item(), 0, plan.total_tokens)

    outcome = backend.run_inference(
        [job(i, a, x) for i, (a, x) in enumerate(zip(names, inputs, strict=True))]
    )
    assert not outcome.failures and backend.step_calls == 3  # one per adapter (None included)
    for i, (adapter, x) in enumerate(zip(names, inputs, strict=True)):
        adapters.activate(adapter)
        with torch.no_grad():
            expected = span(x)
        result = outcome.results[i]
        assert isinstance(result, WireTensor)
        torch.testing.assert_close(from_wire(result), expected, **TOL)


# -- refusals and announcements ----------------------------------------------------------------


def remote(type_name: str) -> Any:
    return pytest.raises(RemoteError, match=f"^{type_name}: ")


@pytest.mark.anyio
async def test_unknown_adapters_are_refused_before_compute(
    serve: Callable[..., Any], lora: Callable[[str, str], Path]
) -> None:
    x = torch.randn(1, 3, HIDDEN)
    async with serve("llama", adapters=(("alpha", lora("llama", "alpha")),)) as harness:
        client = harness.client
        with remote("UnknownAdapter"):
            await client.forward(x, adapter="nope")
        with remote("UnknownAdapter"):
            await client.backward(x, torch.ones_like(x), adapter="beta")
        opening = InferenceOpen(MODEL, 0, BLOCKS, 8, 1, b"x", "float32", None, adapter="Alpha")
        with remote("UnknownAdapter"):
            async with client.rpc.open_stream(client.server, "span.inference", timeout=60) as s:
                await s.send(opening)
                await s.receive_as(InferenceOpened)
        assert harness.server.compute.stats.training_requests == 0
        info = await client.info()
        assert info.adapters == ("alpha",)
        # the server keeps serving
        assert (await client.forward(x, adapter="alpha")).shape == x.shape


@pytest.mark.anyio
async def test_servers_announce_their_adapters(
    checkpoint: Callable[[str], Path], lora: Callable[[str, str], Path], tmp_path: Path
) -> None:
    from distllm.dht.schema import decode_server_entry
    from distllm.testing.swarm import TEST_SERVER_CONFIG, local_swarm

    model = tmp_path / "tiny-llama"
    shutil.copytree(checkpoint("llama"), model)
    with_adapters = replace(
        TEST_SERVER_CONFIG,
        adapters=(("alpha", lora("llama", "alpha")), ("beta", lora("llama", "beta"))),
    )
    async with local_swarm(model, [(0, 2), (2, 4)], server_configs=[with_adapters, None]) as swarm:
        found = await swarm.bootstrap.get_many(["tiny-llama/0", "tiny-llama/3"])
        (first,) = found["tiny-llama/0"].values()
        (second,) = found["tiny-llama/3"].values()
        assert decode_server_entry(first).adapters == ("alpha", "beta")
        assert decode_server_entry(second).adapters == ()


def test_bad_adapters_fail_with_a_clear_error(
    checkpoint: Callable[[str], Path], lora: Callable[[str, str], Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    span = load_span(checkpoint("llama"), 1, 3)

    def variant(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(lora("llama", "alpha"), path)
        return path

    dora = variant("dora")
    edit_config(dora, use_dora=True)
    bias = variant("bias")
    edit_config(bias, bias="all")
    shape = variant("shape")
    tensors = load_file(shape / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, HIDDEN + 1)
    save_file(tensors, shape / "adapter_model.safetensors")
    missing = variant("missing")
    tensors = load_file(missing / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.nope.lora_A.weight"] = torch.zeros(4, 4)
    tensors["base_model.model.model.layers.1.self_attn.nope.lora_B.weight"] = torch.zeros(4, 4)
    save_file(tensors, missing / "adapter_model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dora, "use_dora"),
        (bias, "bias 'all'"),
        (shape, r"block 2 self_attn.q_proj: lora_A \(4, 65\)"),
        (missing, "block 1 self_attn.nope: the block has no such module"),
        (empty, "adapter_config.json is missing"),
        (lora("bloom", "alpha"), "none of its 32 tensors adapts a block"),  # another family's
    ]
    for path, message in cases:
        with pytest.raises(InvalidAdapter, match=message):
            load_adapters(span, [("x", path)])
    # A span outside the broken block loads it fine: only the span's tensors are read.
    load_adapters(load_span(checkpoint("llama"), 3, 4), [("x", shape)])


@pytest.mark.anyio
async def test_a_bad_adapter_fails_the_server_start(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    from distllm.server.config import ServerConfig
    from distllm.server.server import Server
    from distllm.testing import memory_rpc_endpoints

    config = ServerConfig(cache_tokens=256, adapters=(("x", tmp_path),))
    async with memory_rpc_endpoints(1) as (rpc,):
        with pytest.raises(InvalidAdapter, match=r"adapter_config\.json is missing"):
            async with Server(rpc, checkpoint("llama"), MODEL, 0, BLOCKS, config=config):
                pass
