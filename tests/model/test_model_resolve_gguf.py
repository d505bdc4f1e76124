"""A ``.gguf`` file resolves to a checkpoint converted once into the cache.

No GGUF exporter ships with ``gguf`` or ``transformers``, so :func:`write_llama_gguf` writes a
tiny llama the way llama.cpp's converter lays it out (its tensor names, and Q/K rows permuted for
its rotary layout, which transformers undoes on load), in float32: the round trip is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distllm.model import gguf as gguf_module
from distllm.model import load_span
from distllm.model.resolve import resolve_model
from distllm.testing.models import tiny_config, tiny_tokenizer


def _llama_cpp_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each head's rows: [h, 2, d/2] -> [h, d/2, 2].
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(checkpoint: Path, out: Path) -> Path:
    """Write the tiny llama checkpoint at ``checkpoint`` (default tiny config) as GGUF ``out``."""
    import gguf

    config = tiny_config("llama")
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(out.stem)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tiny_tokenizer().get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))  # no merges: one token per character
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(tokens) - 4)
    )
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = _llama_cpp_rotary(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _llama_cpp_rotary(array, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_file_resolves_to_an_equal_converted_checkpoint(
    tiny_model: Callable[..., Path], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = tiny_model("llama")
    gguf_file = write_llama_gguf(original, tmp_path / "tiny-llama.gguf")

    resolved = resolve_model(gguf_file)
    assert resolved.name == "tiny-llama"
    assert resolved.path.parent == cache / "gguf"
    assert resolved.path.name.startswith("tiny-llama-") and len(resolved.path.name) == 23
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            load_span(resolved.path, 1, 4)(x), load_span(original, 1, 4)(x), atol=0, rtol=0
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    assert tokenizer("Hi there!").input_ids == tiny_tokenizer()("Hi there!").input_ids

    # Converted once: resolving again (under another name) does not convert.
    def no_conversion(*args: object, **kwargs: object) -> Path:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_module, "gguf_to_safetensors", no_conversion)
    again = resolve_model(str(gguf_file), name="custom")
    assert (again.name, again.path) == ("custom", resolved.path)


def test_changed_gguf_file_gets_its_own_conversion(
    tiny_model: Callable[..., Path], tmp_path: Path, cache: Path
) -> None:
    first = resolve_model(write_llama_gguf(tiny_model("llama"), tmp_path / "m.gguf")).path
    write_llama_gguf(tiny_model("llama", seed=1), tmp_path / "m.gguf")
    second = resolve_model(tmp_path / "m.gguf").path
    assert first != second
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([first.name, second.name])


def test_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):  # transformers' message
        resolve_model(gguf_file)
    assert list((cache / "gguf").iterdir()) == []


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope\.gguf not found"):
        resolve_model(tmp_path / "nope.gguf")
