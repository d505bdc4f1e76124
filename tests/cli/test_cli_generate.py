"""``distllm generate`` against a swarm of real processes (QUIC over loopback): the streamed
text is what transformers generates locally (greedy, and sampling with a seed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distllm.cli.loopback import LoopbackSwarm, even_spans
from distllm.cli.main import main
from distllm.testing.models import make_tiny_model

pytest.importorskip("distllm.transport.quic")

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def swarm(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of a DHT node and two servers, as processes."""
    with LoopbackSwarm(tmp_path_factory.mktemp("logs")) as procs:
        procs.start_dht()
        for span in even_spans(4, 2):
            procs.add_server(checkpoint, span, extra=("--no-measure", "--num-threads", "1"))
        procs.wait_ready(120)
        yield procs.initial_peers[0]


def _local(checkpoint: Path, max_new_tokens: int, **sampling: object) -> str:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, **sampling)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@pytest.mark.timeout(240)
def test_streams_what_transformers_generates(
    swarm: str, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(checkpoint), "--initial-peers", swarm, "--prompt", PROMPT]
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == _local(checkpoint, 12, do_sample=False) + "\n"
    assert "route:" in err and "tokens/s" in err
    # hop by hop (servers relaying nothing to each other): the same text
    assert main([*argv, "--max-new-tokens", "12", "--no-relay"]) == 0
    assert capsys.readouterr().out == _local(checkpoint, 12, do_sample=False) + "\n"

    sampling = ["--temperature", "0.8", "--top-k", "20", "--seed", "11"]
    assert main([*argv, "--max-new-tokens", "12", *sampling]) == 0
    out, _ = capsys.readouterr()
    torch.manual_seed(11)
    expected = _local(checkpoint, 12, do_sample=True, temperature=0.8, top_k=20)
    assert out == expected + "\n"


def test_bad_arguments_and_a_missing_chat_template(
    swarm: str, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", str(checkpoint), "--initial-peers", swarm, "--prompt", PROMPT]
    assert main([*base, "--max-new-tokens", "0"]) == 2
    assert main(["generate", str(checkpoint), "--initial-peers", "nope", "--prompt", "x"]) == 2
    assert main([*base, "--top-p", "1.5"]) == 2
    assert main([*base, "--chat"]) == 1  # the tiny tokenizer has no chat template
    assert "chat template" in capsys.readouterr().err
