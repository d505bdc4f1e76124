"""The registry of model families a span can be built from, and what differs between them.

We never re-implement a block: each family names transformers' own decoder layer class and says
how to call it -- which positional inputs it wants (rotary cos/sin or an ALiBi bias), how its
attention reaches the cache, where its tensors live in a checkpoint and how many K/V heads it
caches. Everything else (the maths of the block) is transformers'.

Three shapes of block exist:

* :class:`RopeFamily` -- Llama and its relatives (Mistral, Qwen2, Mixtral). Their attention goes
  through transformers' attention interface, so our
  :func:`~distllm.model.attention.distllm_attention` does the paged reads ("grouped" attention,
  no cross-session waste).
* :class:`BloomFamily` -- ALiBi; the block computes attention itself ("concat" attention).
* :class:`FalconFamily` -- rotary, but computes attention itself ("concat" attention). The old
  ALiBi variant of Falcon (``alibi=True``) is not supported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from distllm.model.attention import ATTENTION_NAME, register_attention
from distllm.model.errors import UnsupportedArchitecture
from distllm.model.paged import PagedLayerCache, PagedStep

__all__ = [
    "BloomFamily",
    "ClientPaths",
    "FalconFamily",
    "Family",
    "RopeFamily",
    "TensorSource",
    "get_family",
    "supported_model_types",
]


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ClientPaths:
    """Attribute paths, in the full ``*ForCausalLM`` model, of the parts a client keeps."""

    embed: str
    final_norm: str
    lm_head: str
    embed_norm: str | None = None  # BLOOM normalises the embeddings before the first block


@dataclass(frozen=True)
class TensorSource:
    """How to obtain one tensor of a block: read ``names`` and ``combine`` them."""

    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _single(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


class Family:
    """What it takes to run one architecture's blocks. Subclasses fill the gaps."""

    #: "grouped": attention via our attention-interface entry; "concat": the block attends itself.
    attention: Literal["grouped", "concat"] = "concat"
    #: Where block ``i`` lives in checkpoints, tried in order (``{prefix}{i}.{tensor}``).
    layer_prefixes: tuple[str, ...] = ()

    def __init__(self, model_type: str, layer_class: str, client: ClientPaths) -> None:
        self.model_type = model_type
        self._layer_class = layer_class
        self.client = client

    def check(self, config: PretrainedConfig) -> None:
        """Raise :class:`UnsupportedArchitecture` for variants of the family we cannot run."""

    def prepare_config(self, config: PretrainedConfig) -> None:
        """Adjust a (private copy of the) config before blocks are built from it."""
        config._attn_implementation = "sdpa"
        _plain_experts(config)

    def make_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """Build block ``index`` (its global index: blocks use it to address the cache)."""
        layer: nn.Module = _import(self._layer_class)(config, layer_idx=index)
        return layer

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the K/V a block hands to its cache."""
        raise NotImplementedError

    def make_positional(self, config: PretrainedConfig) -> nn.Module | None:
        """The rotary embedding module shared by the span's blocks, if the family uses one."""
        return None

    def source(self, local_name: str, prefix: str, available: Collection[str]) -> TensorSource:
        """Checkpoint tensors for the block tensor ``local_name`` (default: same name)."""
        return TensorSource((prefix + local_name,), _single)

    def dense_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None
    ) -> dict[str, Any]:
        """Keyword arguments of every block for a stateless causal forward of ``[b, T, h]``."""
        raise NotImplementedError

    def paged_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None, step: PagedStep
    ) -> dict[str, Any]:
        """Keyword arguments of every block for a paged step (input ``[1, T, h]``)."""
        raise NotImplementedError


def _rope(
    positional: nn.Module | None, hidden: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if positional is None:
        raise ValueError("this family needs its rotary embedding module")
    cos, sin = positional(hidden, position_ids)
    return cos, sin


def _plain_experts(config: PretrainedConfig) -> None:
    # Mixture-of-experts blocks dispatch on this; from_pretrained would pick it, we build blocks
    # ourselves. The plain loop over experts runs everywhere.
    if getattr(config, "_experts_implementation", None) is None:
        config._experts_implementation = "eager"


def _causal_bias(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask ``[1, 1, T, T]``: 0 on and below the diagonal, the minimum above."""
    bias = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return bias.triu(1)[None, None]  # [T, T] -> [1, 1, T, T]


class RopeFamily(Family):
    """Llama-like decoders whose attention goes through transformers' attention interface."""

    attention: Literal["grouped", "concat"] = "grouped"
    layer_prefixes = ("model.layers.", "layers.")

    def __init__(
        self, model_type: str, layer_class: str, rotary_class: str, client: ClientPaths
    ) -> None:
        super().__init__(model_type, layer_class, client)
        self._rotary_class = rotary_class

    def prepare_config(self, config: PretrainedConfig) -> None:
        register_attention()
        config._attn_implementation = ATTENTION_NAME
        _plain_experts(config)

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return int(kv_heads), int(head_dim)

    def make_positional(self, config: PretrainedConfig) -> nn.Module | None:
        rotary: nn.Module = _import(self._rotary_class)(config=config)
        return rotary

    def dense_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None
    ) -> dict[str, Any]:
        position_ids = torch.arange(span_input.shape[1], device=span_input.device)[None]  # [1, T]
        return {
            "attention_mask": None,
            "position_ids": position_ids,
            "position_embeddings": _rope(positional, span_input, position_ids),
            "cache": None,
            "use_cache": False,
        }

    def paged_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None, step: PagedStep
    ) -> dict[str, Any]:
        position_ids = step.position_ids[None]  # [T] -> [1, T]
        return {
            "attention_mask": None,
            "position_ids": position_ids,
            "position_embeddings": _rope(positional, span_input, position_ids),
            "cache": PagedLayerCache(step),
            "use_cache": True,
            "distllm_paged": step,
        }


class MixtralFamily(RopeFamily):
    """Mixtral: checkpoints store experts one by one; transformers 5 fuses them per block."""

    def source(self, local_name: str, prefix: str, available: Collection[str]) -> TensorSource:
        if prefix + local_name in available:
            return TensorSource((prefix + local_name,), _single)
        legacy = prefix + "block_sparse_moe."
        if local_name == "mlp.gate.weight":
            return TensorSource((legacy + "gate.weight",), _single)
        experts = sorted(
            {
                int(name[len(legacy + "experts.") :].split(".")[0])
                for name in available
                if name.startswith(legacy + "experts.")
            }
        )
        if local_name == "mlp.experts.gate_up_proj":  # [E, 2 * I, H] = stack(cat(w1, w3))
            names = tuple(f"{legacy}experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3"))
            return TensorSource(names, _stack_gate_up)
        if local_name == "mlp.experts.down_proj":  # [E, H, I] = stack(w2)
            names = tuple(f"{legacy}experts.{e}.w2.weight" for e in experts)
            return TensorSource(names, torch.stack)
        return TensorSource((prefix + local_name,), _single)


def _stack_gate_up(tensors: list[torch.Tensor]) -> torch.Tensor:
    pairs = [torch.cat(tensors[i : i + 2], dim=0) for i in range(0, len(tensors), 2)]  # [2I, H]
    return torch.stack(pairs)  # [E, 2I, H]


class BloomFamily(Family):
    """BLOOM: ALiBi positions, fused QKV, the block computes attention itself."""

    layer_prefixes = ("transformer.h.", "h.")
    _heads = 0

    def prepare_config(self, config: PretrainedConfig) -> None:
        super().prepare_config(config)
        self._heads = int(config.n_head)

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        return int(config.n_head), int(config.hidden_size // config.n_head)

    def _slopes(self, device: torch.device) -> torch.Tensor:
        if not self._heads:
            raise ValueError("BloomFamily.prepare_config was not called")
        # transformers' own ALiBi slopes (private, but the one definition BLOOM was trained with)
        get_slopes = _import("transformers.models.bloom.modeling_bloom:_get_alibi_slopes")
        slopes: torch.Tensor = get_slopes(self._heads, device)  # [heads]
        return slopes

    def dense_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None
    ) -> dict[str, Any]:
        batch, length = span_input.shape[:2]
        slopes = self._slopes(span_input.device)
        positions = torch.arange(length, device=span_input.device)
        alibi = slopes[:, None, None] * positions  # [heads, 1, T]
        alibi = alibi.repeat(batch, 1, 1).to(span_input.dtype)  # [b * heads, 1, T]
        return {
            "alibi": alibi,
            "attention_mask": _causal_bias(length, span_input.dtype, span_input.device),
            "layer_past": None,
            "use_cache": False,
        }

    def paged_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None, step: PagedStep
    ) -> dict[str, Any]:
        if step.key_positions is None:
            raise ValueError("BLOOM needs a concat-mode step")
        slopes = self._slopes(span_input.device)
        # ALiBi only depends on the key's position: softmax ignores a per-query constant.
        alibi = (slopes[:, None, None] * step.key_positions).to(span_input.dtype)  # [heads, 1, K]
        return {
            "alibi": alibi,
            "attention_mask": step.additive_mask(span_input.dtype),
            "layer_past": PagedLayerCache(step),
            "use_cache": True,
        }


class FalconFamily(Family):
    """Falcon with rotary positions (7B/40B/180B); the block computes attention itself."""

    layer_prefixes = ("transformer.h.", "h.")

    def __init__(
        self, model_type: str, layer_class: str, rotary_class: str, client: ClientPaths
    ) -> None:
        super().__init__(model_type, layer_class, client)
        self._rotary_class = rotary_class

    def check(self, config: PretrainedConfig) -> None:
        if getattr(config, "alibi", False):
            raise UnsupportedArchitecture(
                "falcon", supported_model_types(), "Falcon with alibi=True (falcon-rw)"
            )

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        heads = int(config.num_attention_heads)
        head_dim = int(config.hidden_size // heads)
        if config.new_decoder_architecture:
            return heads, head_dim  # the block broadcasts its K/V groups to every head
        if config.multi_query:
            return 1, head_dim
        return heads, head_dim

    def make_positional(self, config: PretrainedConfig) -> nn.Module | None:
        rotary: nn.Module = _import(self._rotary_class)(config=config)
        return rotary

    def dense_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None
    ) -> dict[str, Any]:
        length = span_input.shape[1]
        position_ids = torch.arange(length, device=span_input.device)[None]  # [1, T]
        return {
            "alibi": None,
            "attention_mask": _causal_bias(length, span_input.dtype, span_input.device),
            "position_ids": position_ids,
            "position_embeddings": _rope(positional, span_input, position_ids),
            "layer_past": None,
            "use_cache": False,
        }

    def paged_kwargs(
        self, span_input: torch.Tensor, positional: nn.Module | None, step: PagedStep
    ) -> dict[str, Any]:
        position_ids = step.position_ids[None]  # [T] -> [1, T]
        return {
            "alibi": None,
            "attention_mask": step.additive_mask(span_input.dtype),
            "position_ids": position_ids,
            "position_embeddings": _rope(positional, span_input, position_ids),
            "layer_past": PagedLayerCache(step),
            "use_cache": True,
        }


_LLAMA_CLIENT = ClientPaths(embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head")
_HF = "transformers.models"


def _registry() -> dict[str, Callable[[], Family]]:
    def rope(name: str, prefix: str, cls: type[RopeFamily] = RopeFamily) -> Callable[[], Family]:
        module = f"{_HF}.{name}.modeling_{name}"
        return lambda: cls(
            name,
            f"{module}:{prefix}DecoderLayer",
            f"{module}:{prefix}RotaryEmbedding",
            _LLAMA_CLIENT,
        )

    return {
        "llama": rope("llama", "Llama"),
        "mistral": rope("mistral", "Mistral"),
        "qwen2": rope("qwen2", "Qwen2"),
        "mixtral": rope("mixtral", "Mixtral", MixtralFamily),
        "bloom": lambda: BloomFamily(
            "bloom",
            f"{_HF}.bloom.modeling_bloom:BloomBlock",
            ClientPaths(
                embed="transformer.word_embeddings",
                embed_norm="transformer.word_embeddings_layernorm",
                final_norm="transformer.ln_f",
                lm_head="lm_head",
            ),
        ),
        "falcon": lambda: FalconFamily(
            "falcon",
            f"{_HF}.falcon.modeling_falcon:FalconDecoderLayer",
            f"{_HF}.falcon.modeling_falcon:FalconRotaryEmbedding",
            ClientPaths(
                embed="transformer.word_embeddings",
                final_norm="transformer.ln_f",
                lm_head="lm_head",
            ),
        ),
    }


def supported_model_types() -> tuple[str, ...]:
    """``config.model_type`` values that spans can be built from."""
    return tuple(sorted(_registry()))


def get_family(config: PretrainedConfig) -> Family:
    """The family serving ``config``; :class:`UnsupportedArchitecture` otherwise."""
    model_type = str(getattr(config, "model_type", ""))
    factory = _registry().get(model_type)
    if factory is None:
        raise UnsupportedArchitecture(model_type, supported_model_types())
    family = factory()
    family.check(config)
    return family
