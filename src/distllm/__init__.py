"""distllm: run large language models that no single machine can hold, by pooling machines.

Importing this package has no side effects: no logging configuration, no environment changes,
and torch is not imported until a model is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distllm import errors
from distllm.config import RpcConfig, TransportConfig, WireLimits
from distllm.errors import (
    Busy,
    ConnectError,
    DeadlineExceeded,
    DistllmError,
    LimitExceeded,
    LocalProtocolError,
    PeerGone,
    PeerIdentityMismatch,
    RemoteError,
    RemoteProtocolError,
    TransportError,
)
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID

if TYPE_CHECKING:
    from distllm.client import Client, ClientConfig, NoRouteError, RouteFailedError

# The Hugging Face face (imports transformers too), lazily like the client names below.
if TYPE_CHECKING:
    from distllm.client.hf import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
    from distllm.client.hf_classification import (
        AutoDistributedModelForSequenceClassification,
        DistributedModelForSequenceClassification,
    )

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "Busy",
    "Client",
    "ClientConfig",
    "ConnectError",
    "DeadlineExceeded",
    "DistllmError",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "Identity",
    "LimitExceeded",
    "LocalProtocolError",
    "NoRouteError",
    "PeerAddress",
    "PeerGone",
    "PeerID",
    "PeerIdentityMismatch",
    "RemoteError",
    "RemoteProtocolError",
    "RouteFailedError",
    "RpcConfig",
    "TransportConfig",
    "TransportError",
    "WireLimits",
    "__version__",
    "errors",
]

#: Names imported on first use (they pull in torch), and the module that defines each.
_LAZY = {
    "Client": "distllm.client",
    "ClientConfig": "distllm.client",
    "NoRouteError": "distllm.client",
    "RouteFailedError": "distllm.client",
}

# The Hugging Face face: a block of its own.
_LAZY.update(
    {
        "AutoDistributedModelForCausalLM": "distllm.client.hf",
        "DistributedModelForCausalLM": "distllm.client.hf",
        "AutoDistributedModelForSequenceClassification": "distllm.client.hf_classification",
        "DistributedModelForSequenceClassification": "distllm.client.hf_classification",
    }
)


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
