"""The Hugging Face face: a ``transformers`` causal LM whose blocks run on a swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[ADDR])
    ids = tokenizer("A cat sat", return_tensors="pt").input_ids
    print(tokenizer.decode(model.generate(ids, max_new_tokens=8)[0]))
    model.close()

The model is a :class:`~transformers.PreTrainedModel` with :class:`~transformers.GenerationMixin`:
the embeddings, final norm and LM head are local modules; the blocks are the swarm's.
``generate`` is transformers' own (greedy, sampling, beam search, logits processors, stopping
criteria, streamers); only where its KV cache would be, a :class:`RemoteCache` stands, and each
decoding step is one step of a remote inference session (see :mod:`distllm.client.hf_session`
for how beam reorders and left padding map onto it). Outside ``model.inference_session(...)``
every ``generate`` opens its own session and closes it; inside, they all continue that one.
``model(input_ids)`` is a full forward through the swarm (no session); when gradients are
needed (trainable prompts, unfrozen embeddings) it runs through :class:`RemoteBlocks`, whose
backward asks the servers for the gradients of their inputs and of the deep prompts.

Fine-tuning (``docs/finetuning.md``): ``tuning_mode="ptune"|"deep_ptune"`` adds a trainable
:class:`~distllm.client.ptune.PromptTuning` (the model's only trainable parameters: the local
parts are frozen, as in Petals; unfreeze them by hand if you mean to); ``adapter=NAME`` makes
every remote call use the servers' LoRA adapter ``NAME``; client-side LoRA is plain PEFT
(``peft.get_peft_model(model, LoraConfig(target_modules=["lm_head"]))``).
:class:`DistributedPreTrainedModel` holds what every head shares (the sequence classifier is in
:mod:`distllm.client.hf_classification`).

It is synchronous: the async client runs on an event loop in one daemon thread that the model
owns and :meth:`DistributedModelForCausalLM.close` stops (:mod:`distllm.client.hf_runtime`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from distllm.client.hf_masks import drop_prefix, insert_prefix, leading_pads, real_spans
from distllm.client.hf_runtime import Runtime
from distllm.client.hf_session import DistributedSession, RemoteCache, SessionPrompts
from distllm.client.ptune import DEFAULT_INIT_STD, TUNING_MODES, PromptTuning

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from distllm.client.client import Client
    from distllm.client.config import ClientConfig
    from distllm.client.model import RemoteModel
    from distllm.ids import PeerAddress

__all__ = [
    "AutoDistributedModelForCausalLM",
    "DistributedModelForCausalLM",
    "DistributedPreTrainedModel",
]

M = TypeVar("M", bound="DistributedPreTrainedModel")


class DistributedPreTrainedModel(PreTrainedModel):  # type: ignore[no-untyped-call]
    """What every distributed head shares: the local parts, the swarm behind them, the runtime
    that reaches it, the optional trainable prompts and the server-side adapter's name.

    Build a subclass with ``from_pretrained``. Close it with :meth:`close` or ``with model:``.
    """

    config_class = PretrainedConfig  # one class serves every family: it holds no blocks
    base_model_prefix = "distllm"
    main_input_name = "input_ids"
    # Attention runs on the servers: any implementation the config names is fine here.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        config: PretrainedConfig,
        remote: RemoteModel,
        runtime: Runtime,
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
    ) -> None:
        super().__init__(config)
        self.remote = remote
        self.parts = parts = remote.parts  # embeddings, final norm (, LM head): local
        # Registered as submodules: .device, .dtype, .parameters() and state_dict() see them.
        self.embed_tokens = parts.embed_tokens
        self.embed_norm = parts.embed_norm
        self.final_norm = parts.final_norm
        self._runtime = runtime
        #: The servers' LoRA adapter every remote call of this model uses (``None``: none).
        self.adapter = adapter
        check_tuning(tuning_mode, pre_seq_len)
        self.ptune: PromptTuning | None = None
        if tuning_mode is not None:
            self.ptune = PromptTuning(
                hidden_size=remote.hidden_size,
                num_blocks=remote.num_blocks,
                pre_seq_len=pre_seq_len,
                mode=tuning_mode,
                init_std=float(getattr(config, "initializer_range", DEFAULT_INIT_STD)),
                dtype=parts.embed_tokens.weight.dtype,
                device=parts.embed_tokens.weight.device,
            )
        config.tuning_mode = tuning_mode
        config.pre_seq_len = pre_seq_len if tuning_mode is not None else 0
        # The blocks on the swarm, as a differentiable module (no parameters of its own).
        self.blocks = remote.blocks(adapter=adapter, call=runtime.call)

    def _freeze_local_parts(self) -> None:
        """Local pretrained weights start frozen (as in Petals): only what the user adds
        (prompts, a score head, PEFT adapters) trains. ``requires_grad_(True)`` undoes it."""
        for module in (self.embed_tokens, self.embed_norm, self.final_norm):
            if module is not None:
                module.requires_grad_(False)

    # -- construction and lifetime -------------------------------------------------------------

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[M],
        model: str | Path,
        *,
        initial_peers: Sequence[str | PeerAddress] = (),
        dtype: torch.dtype | str | None = None,
        client_config: ClientConfig | None = None,
        client: Client | None = None,
        portal: BlockingPortal | None = None,
        backend: str = "asyncio",
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
        config_updates: Mapping[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> M:
        """Load the local parts of ``model`` and reach its blocks through the swarm.

        ``model``: a local checkpoint directory, or the embedded default's name
        (``SmolLM2-135M-Instruct``). ``dtype`` of the local parts (default float32).
        A new :class:`~distllm.client.Client` joins the swarm through ``initial_peers`` (other
        keyword arguments go to it: ``identity``, ``host``, ``port``, ``transport_config``;
        ``client_config`` becomes its ``config``), on an event loop of ``backend`` started in a
        thread of its own; the model owns and closes both. Or lend an open ``client`` together
        with the ``portal`` of the loop it runs on (tests, embedders): the model closes neither.

        ``tuning_mode`` (``"ptune"`` or ``"deep_ptune"``) with ``pre_seq_len`` adds trainable
        prompts (:class:`~distllm.client.ptune.PromptTuning`, ``model.ptune``); ``adapter``
        names a LoRA adapter the servers host (``distllm serve --adapter NAME=PATH``): every
        forward, backward and inference session then runs through it. ``config_updates`` are
        set on the model's config before the model is built (a head's own settings).
        """
        from distllm.client.client import Client
        from distllm.model.resolve import resolve_model

        check_tuning(tuning_mode, pre_seq_len)  # before joining the swarm
        if client is not None and portal is None:
            raise ValueError("a lent client needs the portal of the event loop it runs on")
        if client is None and not initial_peers:
            raise ValueError("initial_peers: give at least one peer of the swarm")
        torch_dtype = _dtype(dtype if dtype is not None else client_kwargs.pop("torch_dtype", None))
        resolved = resolve_model(model)
        runtime = Runtime(portal) if portal is not None else Runtime.start(backend)
        try:
            if client is None:
                if client_config is not None:
                    client_kwargs["config"] = client_config
                client = runtime.keep(Client(initial_peers, **client_kwargs))
            remote: RemoteModel = runtime.call(partial(client.model, model, dtype=torch_dtype))
            config = copy.deepcopy(remote.config)  # transformers adjusts it in place
            config.name_or_path = str(resolved.path)
            for key, value in (config_updates or {}).items():
                setattr(config, key, value)
            generation = None
            if (resolved.path / "generation_config.json").is_file():
                generation = GenerationConfig.from_pretrained(resolved.path)
            return cls._from_parts(
                config,
                remote,
                runtime,
                generation,
                tuning_mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                adapter=adapter,
            )
        except BaseException:
            runtime.close()
            raise

    @classmethod
    def _from_parts(
        cls: type[M],
        config: PretrainedConfig,
        remote: RemoteModel,
        runtime: Runtime,
        generation: GenerationConfig | None,
        **options: Any,
    ) -> M:
        """The model over what :meth:`from_pretrained` gathered (``generation``: the
        checkpoint's generation config; only a generating head uses it)."""
        del generation
        return cls(config, remote, runtime, **options)

    def close(self) -> None:
        """Close the client and stop the loop (if the model owns them). Idempotent."""
        self._runtime.close()

    def __enter__(self: M) -> M:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- prompts and blocks --------------------------------------------------------------------

    @property
    def pre_seq_len(self) -> int:
        """Prefix positions the prompts add in front of every row (0 without prompt tuning)."""
        return 0 if self.ptune is None else self.ptune.pre_seq_len

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """The first block's input ``[b, T, h]`` of token ids or of word embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        # The registered modules, not `self.parts`: PEFT may have wrapped them.
        if input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids)
        assert inputs_embeds is not None  # for mypy: one of the two was given
        # As in transformers: word embeddings, before BLOOM's embedding norm.
        norm = self.embed_norm
        hidden: torch.Tensor = inputs_embeds if norm is None else norm(inputs_embeds)
        return hidden

    def _prompts(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The prefix as the first block sees it ``[b, P, h]`` (the prompt embeddings through
        BLOOM's embedding norm, like any word embedding) and the deep prompts
        ``[num_blocks, 1, P, h]``; ``None`` without prompt tuning."""
        if self.ptune is None:
            return None
        prefix, deep = self.ptune(batch_size)
        norm = self.embed_norm
        return (prefix if norm is None else norm(prefix)), deep

    def session_prompts(self) -> SessionPrompts | None:
        """The prompts, detached, for an inference session (``None`` without tuning)."""
        prompts = self._prompts(1)
        if prompts is None:
            return None
        with torch.no_grad():
            prefix, deep = prompts
            return SessionPrompts(prefix.detach(), None if deep is None else deep.detach())

    def _hidden_states(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """All blocks over the inputs: the last block's output ``[b, T, h]`` (the prompts'
        prefix, if any, run in front of each row's real tokens and are cut off again)."""
        hidden = self._embed(input_ids, inputs_embeds)
        batch, length = hidden.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask is {tuple(attention_mask.shape)}; the inputs are {(batch, length)}"
            )
        prompts = self._prompts(batch)
        if prompts is None:
            return self._run_blocks(hidden, attention_mask, None)
        prefix, deep = prompts
        lead = leading_pads(attention_mask, batch)  # the prefix goes after each row's pads
        size = prefix.shape[1]
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, size)  # the prefix: real tokens
            mask = insert_prefix(attention_mask, ones, lead)
        out = self._run_blocks(insert_prefix(hidden, prefix, lead), mask, deep)
        return drop_prefix(out, lead, size)

    def _run_blocks(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, deep: torch.Tensor | None
    ) -> torch.Tensor:
        """All blocks over ``hidden`` ``[b, L, h]``, each row without its leading pads (rows
        with as many pads go together); ``deep``: ``[num_blocks, 1, P, h]`` prompts."""
        batch, length = hidden.shape[:2]
        spans = real_spans(mask, batch, length)
        firsts = sorted({first for first, _ in spans})
        if firsts == [0]:
            return self._blocks(hidden, deep)
        out = hidden.new_zeros(hidden.shape)
        for first in firsts:
            rows = [r for r, (f, _) in enumerate(spans) if f == first]
            out[rows, first:] = self._blocks(hidden[rows, first:], deep)
        return out

    def _blocks(self, hidden: torch.Tensor, deep: torch.Tensor | None) -> torch.Tensor:
        """Every block over ``hidden`` ``[b, T, h]`` from position 0. :class:`RemoteBlocks`
        asks the servers to keep their graphs only when a gradient will be wanted."""
        out: torch.Tensor = self.blocks(hidden, deep)
        return out

    # -- what transformers asks of a model -----------------------------------------------------

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    """A causal LM of any supported family whose blocks are served by a swarm.

    Build it with :meth:`from_pretrained`. Close it with :meth:`close` or ``with model:``.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        remote: RemoteModel,
        runtime: Runtime,
        generation_config: GenerationConfig | None = None,
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
    ) -> None:
        super().__init__(
            config,
            remote,
            runtime,
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            adapter=adapter,
        )
        self.lm_head = self.parts.lm_head
        self._freeze_local_parts()
        self.lm_head.requires_grad_(False)
        if generation_config is not None:
            self.generation_config = generation_config
        self._active: DistributedSession | None = None  # the user's session, if any
        self._session_exit: ExitStack | None = None
        self._call: _GenerateCall | None = None  # set while generate() runs
        self.eval()  # type: ignore[no-untyped-call]

    # -- construction and lifetime -------------------------------------------------------------

    @classmethod
    def _from_parts(
        cls,
        config: PretrainedConfig,
        remote: RemoteModel,
        runtime: Runtime,
        generation: GenerationConfig | None,
        **options: Any,
    ) -> DistributedModelForCausalLM:
        return cls(config, remote, runtime, generation, **options)

    def close(self) -> None:
        """End the active session, close the client and stop the loop (if the model owns
        them). Idempotent."""
        if self._session_exit is not None:
            self._session_exit.close()
        super().close()

    # -- sessions ------------------------------------------------------------------------------

    @contextmanager
    def inference_session(
        self, *, max_length: int, batch_size: int = 1
    ) -> Iterator[DistributedSession]:
        """Open one remote session that every ``generate`` inside the block continues.

        ``max_length``: positions it may reach (prompts, generated tokens and left padding of
        every call together); ``batch_size``: rows (prompts x beams). A prompt-tuned model's
        session holds its prefix too (``pre_seq_len`` more positions on the servers), computed
        from the prompts as they are when the session opens.
        """
        if self._active is not None:
            raise RuntimeError("this model already has an active inference session")
        with ExitStack() as stack:
            session = self._open_session(stack, max_length=max_length, batch_size=batch_size)
            self._active, self._session_exit = session, stack
            try:
                yield session
            finally:
                self._active = self._session_exit = None

    def _open_session(
        self, stack: ExitStack, *, max_length: int, batch_size: int
    ) -> DistributedSession:
        """A remote session (closed with ``stack``) and its synchronous handle."""
        prompts = self.session_prompts()
        extra = 0 if prompts is None else prompts.prefix.shape[1]
        options: dict[str, Any] = {}
        if self.adapter is not None:
            options["adapter"] = self.adapter
        cm = self.remote.inference_session(
            max_length=max_length + extra, batch_size=batch_size, **options
        )
        remote_session = self._runtime.enter(stack, cm)
        return DistributedSession(
            self._runtime,
            remote_session,
            max_length=max_length,
            batch_size=batch_size,
            prompts=prompts,
        )

    @property
    def active_session(self) -> DistributedSession | None:
        """The session opened by :meth:`inference_session`, while its block runs."""
        return self._active

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args: Any,
        session: DistributedSession | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' ``generate``, with the KV caches on the swarm.

        In an active session (or the given ``session``), ``inputs`` are the tokens to *add* to
        the session (none: continue from its last token) and the result holds the session's
        whole sequence; otherwise a session is opened for this call only.
        """
        if self._call is not None:
            raise RuntimeError("generate is already running on this model")
        session = session if session is not None else self._active
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session is not None:
            if session.output_ids is not None and kwargs.get("inputs_embeds") is not None:
                raise ValueError("a session continues from token ids, not inputs_embeds")
            inputs, mask = session.continue_with(inputs, kwargs.pop("attention_mask", None))
            if mask is not None:
                kwargs["attention_mask"] = mask
        with ExitStack() as stack:
            self._call = _GenerateCall(self, stack, session)
            try:
                result = super().generate(inputs, *args, **kwargs)
            finally:
                self._call = None
        if session is not None:
            sequences = result if isinstance(result, torch.Tensor) else result.sequences
            session.remember(sequences)
        return result

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> bool:
        # Called by generate() where transformers would create its DynamicCache.
        if model_kwargs.get("cache") is not None:
            raise ValueError("the KV caches of a distributed model live on its servers: no cache=")
        if generation_config.use_cache is False or self._call is None:
            return False  # every step a full forward through the swarm
        model_kwargs["cache"] = self._call.cache(max(max_cache_length, 1))
        return True

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if isinstance(cache, RemoteCache) and next_sequence_length is None:
            # The prefill: send what the session has not seen -- a whole new prompt, or what a
            # continued session lacks (decoding steps come with next_sequence_length=1).
            if inputs_embeds is not None and is_first_iteration:
                total = inputs_embeds.shape[1]
            else:
                total = input_ids.shape[1]
            next_sequence_length = total - cache.get_seq_length()
            if next_sequence_length < 1:
                raise ValueError("nothing new to send: the session already holds these tokens")
        inputs: dict[str, Any] = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        return inputs

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[b, T, vocab]`` for ``input_ids`` ``[b, T]``.

        With a :class:`RemoteCache` (``generate`` passes one) the tokens are the next step of
        its session; without, a full forward through the swarm (rows may be left- or
        right-padded). Positions follow from the padding: ``position_ids`` is not used.
        Logits at pad positions are meaningless, as in transformers. A prompt-tuned model runs
        its prefix in front of each row's tokens (after its left padding) and returns logits
        of the tokens only; ``labels`` ``[b, T]`` (``-100``: ignored) give the usual loss.
        """
        del position_ids, use_cache  # positions: implied by padding; caching: by `cache`
        if isinstance(cache, RemoteCache):
            hidden = self._embed(input_ids, inputs_embeds)
            hidden = cache.session(hidden.shape[0]).step(hidden, attention_mask)
        elif cache is not None:
            raise TypeError(f"a distributed model takes a RemoteCache, not {type(cache)}")
        else:
            hidden = self._hidden_states(input_ids, inputs_embeds, attention_mask)
        logits = self.lm_head(self.final_norm(slice_logits_to_keep(hidden, logits_to_keep)))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # -- what transformers asks of a model -----------------------------------------------------

    def get_output_embeddings(self) -> torch.nn.Module:
        head: torch.nn.Module = self.lm_head
        return head


class AutoDistributedModelForCausalLM:
    """``transformers.AutoModelForCausalLM``'s counterpart: one class serves every family."""

    @classmethod
    def from_pretrained(cls, model: str | Path, **kwargs: Any) -> DistributedModelForCausalLM:
        """See :meth:`DistributedModelForCausalLM.from_pretrained`."""
        return DistributedModelForCausalLM.from_pretrained(model, **kwargs)


@dataclass
class _GenerateCall:
    """One ``generate`` call: which session its cache steps, and what closes it afterwards."""

    model: DistributedModelForCausalLM
    stack: ExitStack
    session: DistributedSession | None  # the user's session; None: one opened for this call

    def cache(self, max_length: int) -> RemoteCache:
        user = self.session
        if user is None:
            return RemoteCache(partial(self._open, max_length))
        if max_length > user.max_length:
            raise ValueError(
                f"this generation needs {max_length} positions; the session has "
                f"max_length {user.max_length}"
            )
        return RemoteCache(session=user)

    def _open(self, max_length: int, rows: int) -> DistributedSession:
        return self.model._open_session(self.stack, max_length=max_length, batch_size=rows)


def check_tuning(tuning_mode: str | None, pre_seq_len: int) -> None:
    """``ValueError`` unless ``tuning_mode`` and ``pre_seq_len`` go together."""
    if tuning_mode is None:
        if pre_seq_len:
            raise ValueError("pre_seq_len needs a tuning_mode ('ptune' or 'deep_ptune')")
        return
    if tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be None or one of {TUNING_MODES}, got {tuning_mode!r}")
    if not (isinstance(pre_seq_len, int) and pre_seq_len >= 1):
        raise ValueError(f"tuning_mode {tuning_mode!r} needs pre_seq_len >= 1, got {pre_seq_len!r}")


def _dtype(value: torch.dtype | str | None) -> torch.dtype:
    if value is None or value == "auto":
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name, got {value!r}")
    return resolved
