"""The registry of methods an RPC endpoint serves."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from distllm.ids import PeerID
from distllm.rpc.stream import RpcStream

__all__ = ["StreamHandler", "StreamMethod", "UnaryHandler", "UnaryMethod"]

UnaryHandler = Callable[[PeerID, Any], Awaitable[object]]
StreamHandler = Callable[[RpcStream], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UnaryMethod:
    """One request in, one response (or error) out."""

    handler: UnaryHandler
    #: The request must be an instance of this registered message type.
    request_type: type


@dataclass(frozen=True, slots=True)
class StreamMethod:
    """Messages both ways until each side sends end-of-stream."""

    handler: StreamHandler
