"""Tiny random checkpoints of every supported family, for tests (no hub access needed).

``make_tiny_model("llama", tmp_path / "llama")`` writes ``config.json`` and safetensors weights of
a 4-block model (hidden 64, 4 heads, 2 K/V heads where the family has GQA, vocab 128) with
``save_pretrained``, plus a character-level tokenizer (printable ASCII; ids 0-3 are
``<unk> <s> </s> <pad>``). The same family, seed and overrides always give the same weights.

:func:`capture_block_io` records what transformers feeds into and gets out of a range of blocks:
the reference a span must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_FAMILIES",
    "capture_block_io",
    "hf_blocks",
    "make_tiny_lora",
    "make_tiny_model",
    "tiny_config",
    "tiny_tokenizer",
]

TINY_FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "bloom", "falcon")

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "initializer_range": 0.08,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _DECODER,
    "mistral": {**_DECODER, "sliding_window": None},
    "qwen2": _DECODER,
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "bloom": {"hidden_size": 64, "n_layer": 4, "n_head": 4},
    "falcon": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "multi_query": True,
        "new_decoder_architecture": False,
        "max_position_embeddings": 512,
    },
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny ``transformers`` config of ``family`` (see :data:`TINY_FAMILIES`)."""
    from transformers import AutoConfig

    if family not in _DEFAULTS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    return AutoConfig.for_model(family, **{**_COMMON, **_DEFAULTS[family], **overrides})


def make_tiny_model(
    family: str,
    path: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a random tiny ``family`` model under ``path`` and return ``path``.

    ``max_shard_size`` (e.g. ``"20KB"``) writes a sharded checkpoint with an index file.
    ``overrides`` go to the config (``num_hidden_layers=2``, ``sliding_window=6``...).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    out = Path(path)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(out)
    return out


#: LoRA targets of :func:`make_tiny_lora` per family (attention and MLP projections).
_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def make_tiny_lora(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    seed: int = 0,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Save a random (non-zero) PEFT LoRA adapter for the tiny checkpoint at ``model_path`` under
    ``out_dir`` (``adapter_config.json`` + ``adapter_model.safetensors``) and return ``out_dir``.

    ``lora_alpha = 2 * r``; both A and B are random (``init_lora_weights=False``) so the adapter
    changes the outputs. ``target_modules`` defaults to the family's attention and MLP
    projections. The same model, ``r``, seed and targets always give the same adapter.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    family = model.config.model_type
    if target_modules is None:
        if family not in _LORA_TARGETS:
            raise ValueError(f"no default LoRA targets for family {family!r}")
        target_modules = _LORA_TARGETS[family]
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII (99 ids, fits vocab 128)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    symbols = [*_SPECIAL_TOKENS, *(chr(c) for c in range(32, 127))]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    # BPE without merges = one token per character; Fuse joins them back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    unk, bos, eos, pad = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad
    )


def hf_blocks(model: Any) -> Any:
    """The ``ModuleList`` of decoder blocks of a transformers ``*ForCausalLM`` model."""
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def capture_block_io(model: Any, start: int, end: int, input_ids: Any) -> tuple[Any, Any]:
    """Run ``model`` on ``input_ids``; return the input of block ``start`` and the output of block
    ``end - 1`` exactly as transformers computed them (the reference a span must reproduce)."""
    import torch

    blocks = hf_blocks(model)
    seen: dict[str, Any] = {}

    def before(module: Any, args: Any, kwargs: Any) -> None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        seen["output"] = output[0] if isinstance(output, tuple) else output

    hooks = [
        blocks[start].register_forward_pre_hook(before, with_kwargs=True),
        blocks[end - 1].register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["input"], seen["output"]
