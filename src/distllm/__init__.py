"""distllm: run large language models that no single machine can hold, by pooling machines.

Importing this package has no side effects: no logging configuration, no environment changes,
and torch is not imported until a model is touched.
"""

from __future__ import annotations

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

__version__ = "0.1.0.dev0"

__all__ = [
    "Busy",
    "ConnectError",
    "DeadlineExceeded",
    "DistllmError",
    "Identity",
    "LimitExceeded",
    "LocalProtocolError",
    "PeerAddress",
    "PeerGone",
    "PeerID",
    "PeerIdentityMismatch",
    "RemoteError",
    "RemoteProtocolError",
    "RpcConfig",
    "TransportConfig",
    "TransportError",
    "WireLimits",
    "__version__",
    "errors",
]
