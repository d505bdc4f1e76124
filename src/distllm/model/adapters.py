"""LoRA adapters over a span's blocks, from PEFT checkpoints, switched per computation.

:func:`load_adapters` reads, from each adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them), only the LoRA
tensors of the span's blocks, checks them against the blocks, and injects them with ``peft``
(``inject_adapter_in_model``) into the span's linear layers, one named adapter each. The result,
:class:`SpanAdapters`, switches which adapter the span computes with (:meth:`SpanAdapters.use`);
by default none is active and the blocks compute as if no adapter were loaded.

Checkpoint keys look like ``base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight``
(BLOOM: ``...transformer.h.7...``); block 7 of a span starting at 5 is the span's block 2.
Keys of blocks outside the span (and of the embeddings or the head) are not read.

What is honoured (through peft): ``r`` and ``lora_alpha`` (scaling ``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``), ``rank_pattern`` and ``alpha_pattern``,
``fan_in_fan_out`` (it only matters when merging; LoRA is never merged here). What is refused,
when the server starts, with :class:`InvalidAdapter`: another PEFT method than LoRA, DoRA,
LoRA biases or ``bias != "none"``, trained copies of block modules (``modules_to_save``),
LoRA on parameters (``target_parameters``), and any tensor of the span's blocks that is not a
``lora_A``/``lora_B`` weight of an existing linear layer, or whose shape does not fit it.

Only the compute thread may call :meth:`SpanAdapters.use` (it changes the modules' state).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distllm.errors import DistllmError
from distllm.model.span import SpanModel

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "InvalidAdapter", "SpanAdapters", "load_adapters"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: What PEFT puts before the model's own tensor names.
_PEFT_PREFIX = "base_model.model."
#: A LoRA weight: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
#: Config switches that change what LoRA computes in ways this module does not support, with
#: the value that is fine.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "use_bdlora": None,
    "target_parameters": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
}


class InvalidAdapter(DistllmError, ValueError):
    """An adapter cannot be loaded onto this span: missing files, an unsupported configuration,
    or tensors that do not fit the span's blocks."""

    def __init__(self, name: str, path: Path, reason: str) -> None:
        super().__init__(f"adapter {name!r} ({path}): {reason}")
        self.name = name
        self.path = path


@dataclass(frozen=True, slots=True)
class _ModuleLora:
    """One adapted linear layer: its name in ``span.blocks``, its weights and scaling inputs."""

    local: str  # e.g. "2.self_attn.q_proj"
    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    alpha: float


def _read_config(name: str, path: Path) -> Any:
    from peft import LoraConfig

    if not path.is_dir():
        raise InvalidAdapter(name, path, "not a directory")
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / file).is_file():
            raise InvalidAdapter(name, path, f"{file} is missing")
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(name, path, f"unreadable {ADAPTER_CONFIG}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise InvalidAdapter(name, path, f"peft_type {kind!r} is not supported (only LORA)")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception as exc:  # peft validates many combinations; report them as ours
        raise InvalidAdapter(name, path, f"invalid LoRA config: {exc}") from exc
    if getattr(config, "bias", "none") != "none":
        raise InvalidAdapter(name, path, f"bias {config.bias!r} is not supported (only 'none')")
    for key, fine in _UNSUPPORTED.items():
        value = getattr(config, key, fine)
        if value not in (fine, None, False, [], {}):
            raise InvalidAdapter(name, path, f"{key}={value!r} is not supported")
    return config


def _block_of(key: str, prefixes: Sequence[str]) -> tuple[int, str] | None:
    """``(block index, rest)`` of a model tensor name, or ``None`` outside the blocks."""
    for prefix in prefixes:
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if index.isdigit() and rest:
                return int(index), rest
    return None


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    return patterns.get(get_pattern_key(list(patterns), key), default)


def _read_span_loras(name: str, path: Path, config: Any, span: SpanModel) -> list[_ModuleLora]:
    """The adapter's LoRA weights of the span's blocks, checked against them."""
    from safetensors import safe_open

    prefixes = span.family.layer_prefixes
    wanted: dict[str, tuple[int, str]] = {}  # checkpoint key -> (local block, rest)
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as reader:
            keys = list(reader.keys())
            blocks_seen = False
            for key in keys:
                model_key = key.removeprefix(_PEFT_PREFIX)
                found = _block_of(model_key, prefixes)
                blocks_seen = blocks_seen or found is not None
                if found is not None and span.start <= found[0] < span.end:
                    wanted[key] = (found[0] - span.start, found[1])
            tensors = {key: reader.get_tensor(key) for key in wanted}
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(name, path, f"unreadable {ADAPTER_WEIGHTS}: {exc}") from exc
    if keys and not blocks_seen:  # e.g. another architecture's adapter
        raise InvalidAdapter(
            name,
            path,
            f"none of its {len(keys)} tensors adapts a block of this model (expected names "
            f"under {_PEFT_PREFIX}{prefixes[0]}<i>.)",
        )
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, (block, rest) in wanted.items():
        match = _LORA_KEY.fullmatch(rest)
        if match is None:
            raise InvalidAdapter(
                name, path, f"{key}: only lora_A/lora_B weights can adapt the span's blocks"
            )
        parts.setdefault((block, match["module"]), {})[match["part"]] = tensors[key]
    loras = []
    for (block, module_name), pair in sorted(parts.items()):
        where = f"block {span.start + block} {module_name}"
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(name, path, f"{where}: lora_A and lora_B must both be given")
        try:
            module = span.blocks[block].get_submodule(module_name)
        except AttributeError:
            raise InvalidAdapter(name, path, f"{where}: the block has no such module") from None
        if not isinstance(module, nn.Linear):
            raise InvalidAdapter(
                name, path, f"{where}: {type(module).__name__} is not a linear layer"
            )
        lora_a, lora_b = pair["A"], pair["B"]
        original = f"{prefixes[0]}{span.start + block}.{module_name}"
        expected_rank = _pattern_value(config.rank_pattern or {}, original, config.r)
        if lora_a.shape != (expected_rank, module.in_features) or lora_b.shape != (
            module.out_features,
            expected_rank,
        ):
            raise InvalidAdapter(
                name,
                path,
                f"{where}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not "
                f"fit a {module.in_features}->{module.out_features} layer with r={expected_rank}",
            )
        alpha = _pattern_value(config.alpha_pattern or {}, original, config.lora_alpha)
        loras.append(_ModuleLora(f"{block}.{module_name}", lora_a, lora_b, float(alpha)))
    return loras


class SpanAdapters:
    """The adapters injected into a span, and which one it computes with."""

    def __init__(self, span: SpanModel, keys: dict[str, str]) -> None:
        self._span = span
        self._keys = keys  # adapter name -> peft's adapter key in the modules
        self._layers: list[Any] = [m for m in span.blocks.modules() if _is_lora_layer(m)]
        self._active: str | None = None
        self._apply(None)

    @property
    def names(self) -> tuple[str, ...]:
        """The loaded adapters' names, in load order."""
        return tuple(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    @property
    def active(self) -> str | None:
        return self._active

    def activate(self, name: str | None) -> None:
        """Compute with adapter ``name`` from now on (``None``: the plain blocks)."""
        if name == self._active:
            return
        if name is not None and name not in self._keys:
            raise KeyError(f"no adapter {name!r} is loaded (loaded: {self.names})")
        self._apply(name)

    def _apply(self, name: str | None) -> None:
        key = None if name is None else self._keys[name]
        for layer in self._layers:
            if key is None or key not in layer.lora_A:
                layer.enable_adapters(False)  # also leaves every LoRA weight frozen
            else:
                layer.enable_adapters(True)
                layer.set_adapter(key, inference_mode=True)  # frozen: no weight gradients
        self._active = name

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Compute with adapter ``name`` inside the block (it stays active after it: switching
        costs a walk over the layers, so consecutive computations of one adapter skip it)."""
        self.activate(name)
        yield


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def load_adapters(span: SpanModel, adapters: Sequence[tuple[str, Path]]) -> SpanAdapters:
    """Inject the LoRA adapters ``(name, directory)`` into ``span``'s blocks (in place).

    Raises :class:`InvalidAdapter` for an adapter that cannot be served (every adapter is read
    and checked before the first is injected). The span keeps computing without adapters until
    :meth:`SpanAdapters.use`.
    """
    read = []
    for name, path in adapters:
        path = Path(path)
        config = _read_config(name, path)
        read.append((name, path, config, _read_span_loras(name, path, config, span)))
    if not any(loras for *_, loras in read):
        return SpanAdapters(span, {name: f"adapter{i}" for i, (name, *_) in enumerate(read)})

    from peft import LoraConfig, inject_adapter_in_model

    keys: dict[str, str] = {}
    dtype = span.dtype
    for index, (name, path, config, loras) in enumerate(read):
        key = f"adapter{index}"  # peft's keys name submodules: no dots allowed
        keys[name] = key
        if not loras:
            continue
        ranks = {lora.local: lora.lora_a.shape[0] for lora in loras}
        alphas = {lora.local: lora.alpha for lora in loras}
        local = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=sorted(ranks),
            rank_pattern={re.escape(k): r for k, r in ranks.items() if r != config.r},
            alpha_pattern={re.escape(k): a for k, a in alphas.items() if a != config.lora_alpha},
            use_rslora=config.use_rslora,
            fan_in_fan_out=config.fan_in_fan_out,
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=True,
        )
        try:
            inject_adapter_in_model(local, span.blocks, adapter_name=key)
        except Exception as exc:  # peft refuses a layer it cannot wrap
            raise InvalidAdapter(name, path, f"peft could not inject it: {exc}") from exc
        # peft leaves its config on the module it injected into (and warns when it finds one
        # there at the next injection); the layers hold all they need.
        if hasattr(span.blocks, "peft_config"):
            del span.blocks.peft_config
        with torch.no_grad():
            for lora in loras:
                layer: Any = span.blocks.get_submodule(lora.local)
                layer.lora_A[key].weight.copy_(lora.lora_a.to(dtype))
                layer.lora_B[key].weight.copy_(lora.lora_b.to(dtype))
                layer.to(span.device)
    span.requires_grad_(False)
    span.eval()  # new modules start in training mode
    return SpanAdapters(span, keys)
