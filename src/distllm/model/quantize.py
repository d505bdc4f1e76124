"""Weight quantization of a span's blocks through bitsandbytes (the ``quant`` extra).

``int8`` replaces every ``nn.Linear`` of the blocks by ``bitsandbytes.nn.Linear8bitLt``
(LLM.int8(): int8 weights with a scale per output row, outlier input columns computed in 16 bits);
``nf4`` by ``bitsandbytes.nn.Linear4bit`` (4-bit NormalFloat, one absmax per block of
:data:`NF4_BLOCKSIZE` weights, computed in the span's dtype). Norms, biases and weights that are
not ``nn.Linear`` (e.g. Mixtral's fused expert tensors) keep the span's dtype.

Layer shapes are checked on the ``meta`` blocks, before any weight is read
(:func:`check_quantizable`); quantizing (:func:`quantize_linears`) happens after the weights are
materialised. bitsandbytes is imported only when a span is quantized.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Iterator
from typing import Any, Final

import torch
from torch import nn

from distllm.errors import DistllmError

__all__ = [
    "INT8_THRESHOLD",
    "NF4_BLOCKSIZE",
    "NF4_OUT_MULTIPLE",
    "QUANT_MODES",
    "UnsupportedQuantization",
    "check_quantizable",
    "quantize_linears",
    "weight_bytes",
]

#: What ``quant`` may be.
QUANT_MODES: Final = ("none", "int8", "nf4")
#: Weights per absmax in nf4 (bitsandbytes' default). bitsandbytes' fused CPU kernel (taken at
#: inference on CPUs with AVX512-BF16) reads one absmax per this many input columns, so
#: ``in_features`` must be a multiple of it.
NF4_BLOCKSIZE: Final = 64
#: The same kernel packs output rows in groups of 32: ``out_features`` must be a multiple of it.
NF4_OUT_MULTIPLE: Final = 32
#: LLM.int8()'s outlier threshold (bitsandbytes' and transformers' usual value).
INT8_THRESHOLD: Final = 6.0

_INSTALL_HINT = "pip install distllm[quant]"


class UnsupportedQuantization(DistllmError, ValueError):
    """A span cannot be quantized as asked: unknown mode, bitsandbytes missing, or a layer whose
    shape bitsandbytes' kernels cannot take."""


class _Quiet(logging.Filter):
    """Drops bitsandbytes' log lines that say nothing actionable to a server's operator."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_QUIET = {
    # Once, at import, on CPUs with AVX512-BF16: an optional download of faster kernels from the
    # Hugging Face hub; the built-in kernel is used instead.
    "bitsandbytes.backends.cpu.ops": _Quiet("Failed to load CPU gemm_4bit_forward"),
    # On *every* int8 matmul whose input is not float16 (it casts for quantization, on purpose):
    # a line per layer per step would drown the log.
    "bitsandbytes.autograd._functions": _Quiet("MatMul8bitLt: inputs will be cast"),
}


def _bitsandbytes() -> Any:
    for name, quiet in _QUIET.items():
        logging.getLogger(name).addFilter(quiet)  # adding the same filter twice is a no-op
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise UnsupportedQuantization(
            f"weight quantization needs bitsandbytes, which is not importable ({exc}); "
            f"install it with `{_INSTALL_HINT}`"
        ) from exc


def _check_mode(quant: str) -> None:
    if quant not in QUANT_MODES:
        raise UnsupportedQuantization(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _linears(module: nn.Module, bnb: Any | None = None) -> Iterator[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` layers (subclasses included, e.g. Falcon's) not yet quantized."""
    done = () if bnb is None else (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and not isinstance(child, done):
            yield name, child


def check_quantizable(module: nn.Module, quant: str, where: str = "") -> None:
    """Raise :class:`UnsupportedQuantization` unless every linear of ``module`` can be ``quant``.

    Works on ``meta`` modules (only shapes are looked at); ``where`` prefixes layer names in the
    message (e.g. ``"block 3: "``). Also fails when bitsandbytes is needed but not installed.
    """
    _check_mode(quant)
    if quant == "none":
        return
    _bitsandbytes()
    if quant != "nf4":
        return  # int8 takes any shape
    bad = [
        f"{where}{name} ({layer.in_features} -> {layer.out_features})"
        for name, layer in _linears(module)
        if layer.in_features % NF4_BLOCKSIZE or layer.out_features % NF4_OUT_MULTIPLE
    ]
    if bad:
        raise UnsupportedQuantization(
            f"nf4 needs linear layers with in_features a multiple of {NF4_BLOCKSIZE} and "
            f"out_features a multiple of {NF4_OUT_MULTIPLE} (bitsandbytes' CPU kernel); "
            f"not so: {', '.join(bad)}. Serve this model with quant='int8' or 'none'"
        )


def _nf4_weight(layer: Any) -> torch.Tensor:
    """The dequantized ``[out, in]`` weights of an nf4 layer, in its compute dtype."""
    import bitsandbytes.functional as bnb_f

    data, state = layer.weight.data, layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        plain: torch.Tensor = bnb_f.dequantize_4bit(data, state)
        return plain.to(layer.compute_dtype)
    # bitsandbytes repacks the weights for its CPU kernel on the first inference call (see
    # bitsandbytes.functional._convert_weight_packed_for_cpu) and has no dequantization for that
    # layout, so undo it here: byte c of each 32-byte chunk (output rows 32g.., input columns
    # 2p, 2p+1) holds the code of column 2p + c%2 for row 32g + c//2 (low nibble) and for row
    # 32g + 16 + c//2 (high nibble). absmax is [in / blocksize, out].
    out_features, in_features = state.shape
    packed = data.view(torch.uint8).reshape(-1, 32)  # [out/32 * in/2, 32]
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # [out/32 * in/2, 64]: (row, col) pairs
    codes = codes.reshape(out_features // 32, in_features // 2, 32, 2).transpose(1, 2)
    codes = codes.reshape(out_features, in_features)  # [out, in]
    values = state.code.to(torch.float32)[codes.long()]
    scale = state.absmax.to(torch.float32).T.repeat_interleave(state.blocksize, dim=1)  # [out, in]
    weight: torch.Tensor = values * scale
    return weight.to(layer.compute_dtype)


@functools.cache
def _layer_types() -> tuple[type[nn.Module], type[nn.Module]]:
    """Our int8 and nf4 layers: bitsandbytes' own, with their backward paths made sound."""
    _bitsandbytes()
    from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt

    class Int8Linear(Linear8bitLt):  # type: ignore[misc, unused-ignore]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = super().forward(x)
            # Under autograd the output is a view made by bnb's autograd Function, which blocks
            # that add to it in place (Falcon: ``mlp_output += attention_output``) may not touch.
            return out.clone() if out.requires_grad else out

    class NF4Linear(Linear4bit):  # type: ignore[misc, unused-ignore]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                # bnb's fused CPU kernel has no autograd (its gradient would be silently wrong):
                # backward requests go through the dequantized weights instead.
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return nn.functional.linear(x, _nf4_weight(self).to(x.dtype), bias)
            out: torch.Tensor = super().forward(x)
            return out

    return Int8Linear, NF4Linear


def _int8(linear: nn.Linear, device: torch.device) -> nn.Module:
    bnb = _bitsandbytes()
    with torch.device("meta"):  # no throw-away random init
        layer = _layer_types()[0](
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
        )
    # Int8Params quantizes when moved from the CPU to a device (and only then).
    weight = bnb.nn.Int8Params(
        linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False
    )
    layer.weight = weight.to(device)
    layer.bias = linear.bias
    return layer


def _nf4(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    bnb = _bitsandbytes()
    with torch.device("meta"):
        layer = _layer_types()[1](
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            quant_type="nf4",
        )
    # No double quantization of the absmax: the CPU kernel undoes it on first use anyway.
    weight = bnb.nn.Params4bit(
        linear.weight.detach(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        module=layer,
    )
    layer.weight = weight.to(device)  # quantizes on the way
    layer.bias = linear.bias
    return layer


def quantize_linears(module: nn.Module, quant: str, dtype: torch.dtype) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of the materialised ``module`` by its ``quant``
    bitsandbytes twin on the same device; ``dtype`` is the compute dtype. Returns ``module``
    (frozen, eval mode). Call :func:`check_quantizable` first: this does not check shapes."""
    _check_mode(quant)
    if quant == "none":
        return module
    bnb = _bitsandbytes()
    for name, linear in list(_linears(module, bnb)):
        device = linear.weight.device
        layer = _int8(linear, device) if quant == "int8" else _nf4(linear, device, dtype)
        layer.requires_grad_(False).eval()
        # bitsandbytes rearranges a layer's weights in place on its first inference call (int8:
        # scales into the layer state; nf4: the fused CPU kernel's layout). Make that call now,
        # on the loading thread, rather than inside a served step.
        with torch.no_grad():
            layer(torch.zeros(1, linear.in_features, dtype=dtype, device=device))
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, layer)
    module.requires_grad_(False)
    return module.eval()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s weights: parameters and buffers, plus bitsandbytes' quantization
    statistics (int8 row scales, nf4 absmax), each tensor counted once."""
    seen: set[int] = set()
    total = 0

    def add(tensor: object) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in (*module.parameters(), *module.buffers()):
        add(tensor)
        quant_state = getattr(tensor, "quant_state", None)  # nf4
        if quant_state is not None:
            add(quant_state.absmax)
            add(getattr(getattr(quant_state, "state2", None), "absmax", None))
        add(getattr(tensor, "SCB", None))  # int8, until the first forward moves it to the layer
    for child in module.modules():
        add(getattr(getattr(child, "state", None), "SCB", None))  # int8, after
    return total
