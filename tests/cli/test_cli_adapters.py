"""``distllm serve --adapter NAME=PATH``: parsed into the server's adapters; malformed values,
bad names, missing directories and duplicates are refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from distllm.cli.main import build_parser, main
from distllm.identity import Identity
from distllm.ids import PeerAddress


def serve_args(*extra: str) -> list[str]:
    peer = PeerAddress(Identity.generate().peer_id, "127.0.0.1", 1)
    return ["serve", "some-model", "--initial-peers", str(peer), *extra]


def test_adapters_are_parsed_in_order(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = build_parser().parse_args(
        serve_args("--adapter", f"chat={tmp_path / 'a'}", "--adapter", f"v1.2-x_y={tmp_path}/b")
    )
    assert args.adapters == [("chat", tmp_path / "a"), ("v1.2-x_y", tmp_path / "b")]
    assert build_parser().parse_args(serve_args()).adapters == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no-equals-sign", "expected NAME=PATH"),
        ("=somewhere", "expected NAME=PATH"),
        ("name=", "expected NAME=PATH"),
        ("bad name={dir}", "adapter name 'bad name'"),
        ("x={dir}/missing", "no directory"),
    ],
)
def test_bad_adapter_values_are_argparse_errors(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(serve_args("--adapter", value.format(dir=tmp_path)))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and message in err


def test_duplicate_adapter_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distllm.testing.models import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "model", with_tokenizer=False)
    argv = serve_args("--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}")
    argv[1] = str(model)
    assert main(argv) == 2
    assert "adapters must be" in capsys.readouterr().err
