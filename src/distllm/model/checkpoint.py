"""Read selected tensors of a local Hugging Face checkpoint directory.

A checkpoint is ``config.json`` plus either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Files are opened with safetensors' ``safe_open`` (memory-mapped)
and only the named tensors are materialised, so a server hosting a few blocks never pays for the
whole model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["Checkpoint"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensor names of a checkpoint and where each one is stored."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.path / _SINGLE).is_file():
            with safe_open(str(self.path / _SINGLE), framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), _SINGLE)
        else:
            raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {self.path}")
        self._names = frozenset(self._files)

    def names(self) -> frozenset[str]:
        """Every tensor name the checkpoint holds."""
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def read(
        self, names: Iterable[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Load exactly the named tensors, one file at a time; floats are cast to ``dtype``."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self._files:
                raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.path}")
            by_file[self._files[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, wanted in by_file.items():
            with safe_open(str(self.path / filename), framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensor = handle.get_tensor(name)
                    cast = dtype is not None and tensor.is_floating_point()
                    out[name] = tensor.to(dtype) if cast else tensor
        return out
