"""Running spans of transformer blocks from local Hugging Face checkpoints (torch side layer).

* :func:`load_span` -- blocks ``[start, end)`` of a checkpoint, reading only their tensors;
  :class:`SpanModel` runs them statelessly (``forward``) or over a :class:`PagedKVCache`
  (``step``, batched across sessions).
* :func:`load_client_parts` -- the embeddings, final norm and LM head a client keeps.
* :func:`supported_model_types` -- the architectures served; others raise
  :class:`UnsupportedArchitecture`.

The blocks are transformers' own modules; see :mod:`distllm.model.families` for how each family
is driven and :mod:`distllm.model.paged` for attention over pages.
"""

from __future__ import annotations

from distllm.model.errors import CacheFull, UnsupportedArchitecture
from distllm.model.families import supported_model_types
from distllm.model.kv import PagedKVCache
from distllm.model.loading import ClientParts, load_client_parts, load_config, load_span
from distllm.model.span import SpanModel, StepInput

__all__ = [
    "CacheFull",
    "ClientParts",
    "PagedKVCache",
    "SpanModel",
    "StepInput",
    "UnsupportedArchitecture",
    "load_client_parts",
    "load_config",
    "load_span",
    "supported_model_types",
]
