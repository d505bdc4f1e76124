from __future__ import annotations

import pytest

import distllm
from distllm.config import RpcConfig, TransportConfig, WireLimits
from distllm.errors import (
    Busy,
    DeadlineExceeded,
    DistllmError,
    PeerGone,
    PeerIdentityMismatch,
    RemoteError,
    RemoteProtocolError,
    TransportError,
)


def test_defaults_are_valid() -> None:
    assert TransportConfig().max_datagram_size == 1200
    assert RpcConfig().limits == WireLimits()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: TransportConfig(max_datagram_size=1000),
            "max_datagram_size must be in 1200..16384, got 1000",
        ),
        (
            lambda: TransportConfig(loopback_datagram_size=65536),
            "loopback_datagram_size must be in 1200..16384, got 65536",
        ),
        (lambda: TransportConfig(connect_timeout=0), "connect_timeout must be > 0, got 0"),
        (
            lambda: TransportConfig(keepalive_interval=1.0, dead_peer_timeout=0.5),
            "dead_peer_timeout must be > keepalive_interval, got 0.5",
        ),
        (
            lambda: TransportConfig(stream_send_window=10),
            "stream_send_window must be >= 65536, got 10",
        ),
        (lambda: WireLimits(max_frame_bytes=10), "max_frame_bytes must be >= 1024, got 10"),
        (lambda: WireLimits(max_tensor_dims=0), "max_tensor_dims must be in 1..64, got 0"),
        (lambda: RpcConfig(default_timeout=-1), "default_timeout must be > 0, got -1"),
    ],
)
def test_validation_messages_are_exact(factory, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as info:
        factory()
    assert str(info.value) == message


def test_configs_are_frozen() -> None:
    config = TransportConfig()
    with pytest.raises(AttributeError):
        config.max_datagram_size = 9000  # type: ignore[misc]


def test_error_hierarchy() -> None:
    assert issubclass(PeerGone, TransportError)
    assert issubclass(TransportError, DistllmError)
    assert issubclass(RemoteProtocolError, DistllmError)
    assert issubclass(DeadlineExceeded, TimeoutError)
    err = RemoteError("ValueError", "bad span")
    assert (err.type_name, err.message) == ("ValueError", "bad span")
    assert Busy("full", retry_after=2.5).retry_after == 2.5
    assert "expected peer" in str(PeerIdentityMismatch("a", "b"))


def test_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = (
        "import logging, sys, os; before = dict(os.environ); import distllm; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not logging.getLogger().handlers, 'logging configured'; "
        "assert dict(os.environ) == before, 'environment changed'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert distllm.__all__
