"""int8 and nf4 spans (bitsandbytes, CPU path): close to fp32, smaller, odd shapes refused.

Tolerances are relative errors ``|y_q - y| / |y|`` of a 4-block tiny llama's hidden states
(measured: int8 ~1.0%, nf4 ~8.6%; gradients w.r.t. the input ~1.3% and ~16%). These tests need
bitsandbytes and fail without it: quantization is a feature we ship, not an optional nicety.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from distllm.dht.schema import decode_server_entry
from distllm.model import PagedKVCache, StepInput, load_span
from distllm.model.quantize import (
    NF4_BLOCKSIZE,
    NF4_OUT_MULTIPLE,
    QUANT_MODES,
    UnsupportedQuantization,
    _nf4,
    _nf4_weight,
    check_quantizable,
    weight_bytes,
)
from distllm.protocol import (
    METHOD_INFERENCE,
    InferenceOpen,
    InferenceOpened,
    InferenceOutput,
    InferenceStep,
)
from distllm.server.config import QUANTIZATIONS, ServerConfig
from distllm.server.server import Server
from distllm.server.tensors import from_wire, to_wire
from distllm.testing import memory_rpc_endpoints
from distllm.testing.swarm import local_swarm

#: Most relative error of the span's output (and of its input gradient) per mode.
OUTPUT_TOL = {"int8": 0.03, "nf4": 0.15}
GRAD_TOL = {"int8": 0.05, "nf4": 0.25}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_bitsandbytes_is_installed() -> None:
    import bitsandbytes  # noqa: F401  (the import itself is the test)


def test_modes_agree_with_the_server_config() -> None:
    assert QUANTIZATIONS == QUANT_MODES


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_forward_and_paged_steps_close_to_fp32(quant: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    exact = load_span(path, 0, 4)
    span = load_span(path, 0, 4, quant=quant)
    assert span.dtype == torch.float32  # the compute dtype, not the int8/uint8 storage
    x = torch.randn(2, 12, span.hidden_size)
    with torch.no_grad():
        expected = exact(x)
        out = span(x)
    assert rel_err(out, expected) < OUTPUT_TOL[quant]

    cache = PagedKVCache(span, num_pages=8, page_size=4)
    cache.open("s")
    with torch.no_grad():
        steps = [span.step(cache, [StepInput("s", x[0, :5], 0)])[0]]
        steps += [span.step(cache, [StepInput("s", x[0, i : i + 1], i)])[0] for i in range(5, 9)]
        # roll back to 7 and go on
        steps_b = span.step(cache, [StepInput("s", x[1, 7:9], 7)])[0]
        reference_b = span(torch.cat([x[0, :7], x[1, 7:9]])[None])[0, 7:]
    # The same quantized kernels either way: paged steps match the dense forward closely.
    torch.testing.assert_close(torch.cat(steps), out[0, :9], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps_b, reference_b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_input_gradient_close_to_fp32_after_inference(
    quant: str, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model("llama")
    exact = load_span(path, 0, 4)
    span = load_span(path, 0, 4, quant=quant)
    x = torch.randn(1, 6, span.hidden_size)
    with torch.no_grad():
        span(x)  # inference first, as on a server (nf4 then runs bitsandbytes' fused kernel)
    grads = []
    for model in (exact, span):
        leaf = x.clone().requires_grad_(True)
        model(leaf).square().sum().backward()
        assert leaf.grad is not None
        grads.append(leaf.grad)
    assert rel_err(grads[1], grads[0]) < GRAD_TOL[quant]


@pytest.mark.parametrize("family", ["bloom", "falcon", "qwen2"])
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_other_families_with_biases_and_in_place_adds(
    family: str, quant: str, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model(family)
    exact = load_span(path, 0, 2)
    span = load_span(path, 0, 2, quant=quant)
    x = torch.randn(1, 5, span.hidden_size)
    with torch.no_grad():
        assert rel_err(span(x), exact(x)) < OUTPUT_TOL[quant]
    leaf = x.clone().requires_grad_(True)
    span(leaf).sum().backward()  # Falcon adds to a linear's output in place
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize(("quant", "most"), [("int8", 0.30), ("nf4", 0.16)])
def test_quantized_weights_take_less_memory(
    quant: str, most: float, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model("llama")
    exact = load_span(path, 0, 4)
    span = load_span(path, 0, 4, quant=quant)
    # fp32 592 KB; int8 158 KB (int8 weights, fp32 row scales, norms); nf4 80 KB.
    loaded = weight_bytes(span)
    assert loaded < most * weight_bytes(exact)
    # bitsandbytes' first-call rearrangement happened while loading, not in a served step
    data = [p.data_ptr() for p in span.parameters()]
    with torch.no_grad():
        span(torch.randn(1, 1, span.hidden_size))
    assert [p.data_ptr() for p in span.parameters()] == data
    assert weight_bytes(span) == loaded


def test_bfloat16_nf4(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    exact = load_span(path, 0, 4)
    span = load_span(path, 0, 4, dtype=torch.bfloat16, quant="nf4")
    assert span.dtype == torch.bfloat16
    x = torch.randn(1, 6, span.hidden_size)
    with torch.no_grad():
        assert rel_err(span(x).float(), exact(x)) < OUTPUT_TOL["nf4"]


def test_nf4_odd_sizes_are_refused_before_loading(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(
        "llama", hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=1
    )
    with pytest.raises(UnsupportedQuantization, match="nf4 needs") as info:
        load_span(path, 1, 3, quant="nf4")
    message = str(info.value)
    assert "block 1: self_attn.q_proj (48 -> 48)" in message
    assert (
        f"multiple of {NF4_BLOCKSIZE}" in message and f"multiple of {NF4_OUT_MULTIPLE}" in message
    )
    assert isinstance(info.value, ValueError)
    # int8 takes any shape
    span = load_span(path, 1, 3, quant="int8")
    with torch.no_grad():
        assert span(torch.randn(1, 3, 48)).shape == (1, 3, 48)


def test_unknown_mode_is_refused(tiny_model: Callable[..., Path]) -> None:
    with pytest.raises(UnsupportedQuantization, match=r"quant must be one of .*got 'fp4'"):
        load_span(tiny_model("llama"), 0, 1, quant="fp4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(UnsupportedQuantization, match=r"pip install distllm\[quant\]"):
        check_quantizable(torch.nn.Linear(64, 64), "int8")
    check_quantizable(torch.nn.Linear(64, 64), "none")  # needs nothing


def test_nf4_dequantization_of_the_fused_cpu_layout() -> None:
    # Our backward path reads bitsandbytes' private CPU layout; this catches a change of it.
    linear = torch.nn.Linear(128, 96)
    layer = _nf4(linear, torch.device("cpu"), torch.float32).eval()
    before = _nf4_weight(layer)
    assert rel_err(before, linear.weight.detach()) < 0.12
    with torch.no_grad():
        layer(torch.randn(1, 1, 128))
    after = _nf4_weight(layer)  # the weights may be repacked by now (AVX512-BF16 CPUs)
    torch.testing.assert_close(after, before, atol=2e-3, rtol=0)  # absmax became bfloat16


def test_int8_steps_do_not_spam_the_log(
    tiny_model: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    span = load_span(tiny_model("llama"), 0, 1, quant="int8")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        span(torch.randn(1, 2, span.hidden_size))
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


# -- the server -------------------------------------------------------------------------------


def test_server_config_validates_quant() -> None:
    assert ServerConfig().quant == "none"
    with pytest.raises(
        ValueError, match=r"^quant must be one of \('none', 'int8', 'nf4'\), got 'q4'$"
    ):
        ServerConfig(quant="q4")


def test_serve_command_passes_quant_to_the_server_config(
    tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from distllm.cli.main import build_parser

    planned: list[Any] = []
    monkeypatch.setattr(anyio, "run", lambda job, **kwargs: planned.append(job.args[1]))
    peer = "distllm://" + "a" * 52 + "@127.0.0.1:9"
    args = build_parser().parse_args(
        ["serve", str(tiny_model("llama")), "--initial-peers", peer, "--quant", "nf4"]
    )
    assert args.run(args) == 0
    assert planned[0].server.quant == "nf4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--initial-peers", peer, "--quant", "fp4"])


@pytest.mark.anyio
async def test_int8_server_serves_steps(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    config = ServerConfig(quant="int8", cache_tokens=64, page_size=4, max_length=32)
    local = load_span(path, 0, 4, quant="int8")
    exact = load_span(path, 0, 4)
    x = torch.randn(1, 6, local.hidden_size)
    async with (
        memory_rpc_endpoints(2) as (server_rpc, client_rpc),
        Server(server_rpc, path, "tiny", 0, 4, config=config) as server,
        client_rpc.open_stream(server_rpc.address, METHOD_INFERENCE, timeout=60) as stream,
    ):
        await stream.send(InferenceOpen("tiny", 0, 4, 32, 1, b"quant", "float32", None))
        with anyio.fail_after(30):
            await stream.receive_as(InferenceOpened)
        outputs = []
        for step_id, (begin, end) in enumerate([(0, 4), (4, 5), (5, 6)]):
            hidden = to_wire(x[:, begin:end], "float32", "none")
            await stream.send(InferenceStep(hidden, None, None, None, step_id))
            with anyio.fail_after(30):
                reply = await stream.receive_as(InferenceOutput)
            outputs.append(from_wire(reply.hidden).float())
        assert server.info().dtype == "float32"
    out = torch.cat(outputs, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(out, local(x), atol=1e-4, rtol=1e-4)
        assert rel_err(out, exact(x)) < OUTPUT_TOL["int8"]


@pytest.mark.anyio
async def test_swarm_server_announces_its_quantization(tiny_model: Callable[..., Path]) -> None:
    config = ServerConfig(quant="nf4", cache_tokens=64)
    async with local_swarm(tiny_model("llama"), [(0, 4)], server_config=config) as swarm:
        found = await swarm.bootstrap.get_many([f"{swarm.model_name}/0"])
        (entry,) = found[f"{swarm.model_name}/0"].values()
        record = decode_server_entry(entry)
        assert record.quantization == "nf4"
        assert record.dtype == "float32"


@pytest.mark.anyio
async def test_server_refuses_nf4_of_odd_sizes(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(
        "llama", hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=1
    )
    async with memory_rpc_endpoints(1) as (rpc,):
        with pytest.raises(UnsupportedQuantization, match="nf4 needs"):
            async with Server(rpc, path, "odd", 0, 4, config=ServerConfig(quant="nf4")):
                pass
