"""L3 RPC: unary calls and message streams over transport streams, with deadlines and limits."""

from __future__ import annotations

from distllm.rpc.endpoint import RpcEndpoint
from distllm.rpc.errors import UnknownMethod
from distllm.rpc.stream import RpcStream

__all__ = ["RpcEndpoint", "RpcStream", "UnknownMethod"]
