"""Errors of the client."""

from __future__ import annotations

from collections.abc import Iterable

from distllm.errors import DistllmError

__all__ = ["NoRouteError"]


class NoRouteError(DistllmError):
    """The swarm, minus banned peers, cannot serve a range of blocks.

    ``blocks`` are exactly the blocks of the range that no usable server holds (sorted);
    ``banned`` counts the banned peers that do hold some of them (0: nobody holds them at all).
    """

    def __init__(self, model: str, blocks: Iterable[int], *, banned: int = 0) -> None:
        self.model = model
        self.blocks: tuple[int, ...] = tuple(sorted(blocks))
        self.banned = banned
        reason = f" (banned: {banned} peer{'s' if banned != 1 else ''})" if banned else ""
        super().__init__(
            f"no server holds block{'s' if len(self.blocks) != 1 else ''}"
            f" {_format_blocks(self.blocks)} of model {model!r}{reason}"
        )


def _format_blocks(blocks: tuple[int, ...]) -> str:
    """``0, 1, 5..9``: runs of three or more collapse (a model has hundreds of blocks)."""
    parts: list[str] = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{blocks[i]}..{blocks[j]}")
        else:
            parts.extend(str(b) for b in blocks[i : j + 1])
        i = j + 1
    return ", ".join(parts)
