"""Errors of the model layer."""

from __future__ import annotations

from collections.abc import Iterable

from distllm.errors import Busy, DistllmError

__all__ = ["CacheFull", "UnsupportedArchitecture"]


class UnsupportedArchitecture(DistllmError, ValueError):
    """The checkpoint's architecture (``config.model_type``) cannot be served."""

    def __init__(self, model_type: str, supported: Iterable[str], detail: str = "") -> None:
        self.model_type = model_type
        self.supported = tuple(sorted(supported))
        reason = f" ({detail})" if detail else ""
        super().__init__(
            f"model_type {model_type!r} is not supported{reason}; "
            f"supported: {', '.join(self.supported)}"
        )


class CacheFull(Busy):
    """The KV cache has no room for a step; nothing was changed. Retry later or elsewhere."""

    def __init__(self, needed_tokens: int, free_tokens: int) -> None:
        super().__init__(
            f"KV cache full: the step needs up to {needed_tokens} tokens, {free_tokens} are free"
        )
        self.needed_tokens = needed_tokens
        self.free_tokens = free_tokens
