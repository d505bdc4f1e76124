"""L5 client: fault-tolerant inference sessions and remote forward/backward over the swarm.

Public names (imported on first use, so that the pure routing cores -- ``swarm``, ``planner``,
``bans``, ``routes`` -- stay importable without torch):

- :class:`Client` -- a peer of the swarm (transport, RPC, DHT node in client mode);
- :class:`RemoteModel` -- a model's local parts and routing state (``client.model(...)``);
- :class:`InferenceSession` -- a session through a chain of servers, with failover;
- :class:`RemoteBlocks` -- every block as a module of a local autograd graph
  (``model.blocks()``), and :class:`Gradients` (``model.backward``);
- :class:`PromptTuning` -- trainable (deep) prompts for prompt tuning (``client/ptune.py``);
- :class:`ClientConfig`, the errors :class:`NoRouteError` and :class:`RouteFailedError`, and the
  session events :class:`RouteChanged`, :class:`HopFailed`, :class:`SessionStats`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distllm.client.autograd import Gradients
    from distllm.client.client import Client
    from distllm.client.config import ClientConfig
    from distllm.client.errors import NoRouteError
    from distllm.client.events import HopFailed, RouteChanged, SessionStats
    from distllm.client.failures import RouteFailedError
    from distllm.client.model import RemoteModel
    from distllm.client.planner import RouteHop
    from distllm.client.ptune import PromptTuning
    from distllm.client.remote_blocks import RemoteBlocks
    from distllm.client.session import InferenceSession

__all__ = [
    "Client",
    "ClientConfig",
    "Gradients",
    "HopFailed",
    "InferenceSession",
    "NoRouteError",
    "PromptTuning",
    "RemoteBlocks",
    "RemoteModel",
    "RouteChanged",
    "RouteFailedError",
    "RouteHop",
    "SessionStats",
]

_HOMES = {
    "Client": "client",
    "ClientConfig": "config",
    "Gradients": "autograd",
    "HopFailed": "events",
    "InferenceSession": "session",
    "NoRouteError": "errors",
    "PromptTuning": "ptune",
    "RemoteBlocks": "remote_blocks",
    "RemoteModel": "model",
    "RouteChanged": "events",
    "RouteFailedError": "failures",
    "RouteHop": "planner",
    "SessionStats": "events",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
