"""ServerConfig validation: exact messages naming the field, the rule and the value."""

from __future__ import annotations

import pytest

from distllm.server.config import ServerConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int8"}, "dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int8'"),
        ({"page_size": 0}, "page_size must be >= 1, got 0"),
        ({"cache_tokens": 8, "page_size": 16}, "cache_tokens must be >= page_size, got 8"),
        ({"cache_bytes": 0}, "cache_bytes must be None or > 0, got 0"),
        ({"max_length": 0}, "max_length must be >= 1, got 0"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_step_tokens": 0}, "max_step_tokens must be >= 1, got 0"),
        ({"max_request_tokens": 0}, "max_request_tokens must be >= 1, got 0"),
        ({"max_batch_tokens": 0}, "max_batch_tokens must be >= 1, got 0"),
        (
            {"prefill_chunk_tokens": 4096},
            "prefill_chunk_tokens must be in 1..max_batch_tokens, got 4096",
        ),
        ({"max_batch_sessions": 0}, "max_batch_sessions must be None or >= 1, got 0"),
        ({"batch_window": -1.0}, "batch_window must be >= 0, got -1.0"),
        ({"batch_window": float("nan")}, "batch_window must be >= 0, got nan"),
        ({"max_queued_items": 0}, "max_queued_items must be >= 1, got 0"),
        (
            {"max_queued_tokens": 100},
            "max_queued_tokens must be >= max_step_tokens and >= max_request_tokens, got 100",
        ),
        ({"max_training_wait": -1}, "max_training_wait must be >= 0, got -1"),
        ({"max_sessions": 0}, "max_sessions must be >= 1, got 0"),
        ({"session_idle_timeout": 0}, "session_idle_timeout must be > 0, got 0"),
        ({"step_timeout": 0}, "step_timeout must be > 0, got 0"),
        ({"num_threads": 0}, "num_threads must be None or >= 1, got 0"),
        (
            {"compression": "zip"},
            "compression must be one of ('none', 'float16', 'bfloat16', 'int8_blockwise'), "
            "got 'zip'",
        ),
    ],
)
def test_invalid_values_name_field_rule_and_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as error:
        ServerConfig(**kwargs)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_defaults_are_valid() -> None:
    config = ServerConfig()
    assert config.cache_tokens // config.page_size == 512
    assert config.max_batch_sessions is None and not config.reserve_max_length
