"""Build a span, or the client's parts, from a local checkpoint without loading the whole model.

Modules are created on the ``meta`` device (no memory, no random init), then given exactly the
tensors they need, read through :class:`~distllm.model.checkpoint.Checkpoint`. Weights are frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from distllm.model.checkpoint import Checkpoint
from distllm.model.families import Family, get_family
from distllm.model.quantize import check_quantizable, quantize_linears
from distllm.model.span import SpanModel

__all__ = ["ClientParts", "load_client_parts", "load_config", "load_span"]


def load_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config (``config.json``), read locally."""
    config: PretrainedConfig = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return config


def _materialize(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give a meta-device module its tensors; freeze it."""
    module.load_state_dict(dict(tensors), strict=True, assign=True)
    still_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors left without values: {still_meta}")
    module.requires_grad_(False)
    return module.eval()


def _block_prefix(family: Family, checkpoint: Checkpoint, index: int) -> str:
    """Prefix of block ``index``'s tensor names, e.g. ``model.layers.3.``."""
    names = checkpoint.names()
    for prefix in family.layer_prefixes:
        marker = f"{prefix}{index}."
        if any(name.startswith(marker) for name in names):
            return marker
    raise ValueError(
        f"block {index} not found in {checkpoint.path} (tried {family.layer_prefixes})"
    )


def load_span(
    path: str | Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quant: str = "none",
) -> SpanModel:
    """Load blocks ``[start, end)`` of the checkpoint at ``path``, reading only their tensors.

    ``quant`` (``"none"``, ``"int8"``, ``"nf4"``) quantizes the blocks' linear layers with
    bitsandbytes (:mod:`distllm.model.quantize`), computing in ``dtype``; layers it cannot take
    raise :class:`~distllm.model.quantize.UnsupportedQuantization` before any weight is read.
    """
    config = load_config(path)
    family = get_family(config)
    num_layers = int(config.num_hidden_layers)
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"span [{start}, {end}) is not within the model's {num_layers} blocks")
    family.prepare_config(config)
    checkpoint = Checkpoint(path)
    available = checkpoint.names()
    blocks: list[nn.Module] = []
    for index in range(start, end):
        with torch.device("meta"):
            block = family.make_layer(config, index)
        check_quantizable(block, quant, where=f"block {index}: ")
        prefix = _block_prefix(family, checkpoint, index)
        sources = {local: family.source(local, prefix, available) for local in block.state_dict()}
        read = checkpoint.read({n for s in sources.values() for n in s.names}, dtype)
        tensors = {
            local: source.combine([read[n] for n in source.names]).to(device)
            for local, source in sources.items()
        }
        blocks.append(quantize_linears(_materialize(block, tensors), quant, dtype))
    positional = family.make_positional(config)
    if positional is not None:
        positional = positional.to(device)
    return SpanModel(config, family, start, blocks, positional)


@dataclass
class ClientParts:
    """What a client runs locally: embeddings (+ BLOOM's embedding norm), final norm, LM head."""

    config: PretrainedConfig
    embed_tokens: nn.Embedding
    embed_norm: nn.Module | None
    final_norm: nn.Module
    lm_head: nn.Linear

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, T]`` -> the first block's input ``[b, T, h]``."""
        hidden: torch.Tensor = self.embed_tokens(input_ids)
        return hidden if self.embed_norm is None else self.embed_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[b, T, h]`` -> logits ``[b, T, vocab]``."""
        logits: torch.Tensor = self.lm_head(self.final_norm(hidden))
        return logits


def load_client_parts(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ClientParts:
    """Load only the embeddings, final norm and LM head of the checkpoint at ``path``."""
    config = load_config(path)
    family = get_family(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    checkpoint = Checkpoint(path)

    def part(attr: str) -> nn.Module:
        module = skeleton.get_submodule(attr)
        names = {local: f"{attr}.{local}" for local in module.state_dict()}
        read = checkpoint.read(names.values(), dtype)
        return _materialize(module, {k: read[v].to(device) for k, v in names.items()})

    paths = family.client
    embed = part(paths.embed)
    head_weight = f"{paths.lm_head}.weight"
    if head_weight in checkpoint:
        head = part(paths.lm_head)
    else:  # tied embeddings: the checkpoint stores the matrix once
        head = skeleton.get_submodule(paths.lm_head)
        _materialize(head, {"weight": embed.get_parameter("weight")})
    embed_norm = part(paths.embed_norm) if paths.embed_norm else None
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise TypeError(f"unexpected client modules: {type(embed)}, {type(head)}")
    return ClientParts(config, embed, embed_norm, part(paths.final_norm), head)
