"""ClientConfig validation, and the public names: ``import distllm`` stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distllm.client import ClientConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("step_timeout", 0, "step_timeout must be a finite number > 0, got 0"),
        ("connect_timeout", float("inf"), "connect_timeout must be a finite number > 0, got inf"),
        ("close_timeout", -1.0, "close_timeout must be a finite number > 0, got -1.0"),
        ("max_retries", -1, "max_retries must be an int >= 0, got -1"),
        ("max_retries", 1.5, "max_retries must be an int >= 0, got 1.5"),
        ("max_forward_tokens", 0, "max_forward_tokens must be an int >= 1, got 0"),
        ("max_forward_tokens", True, "max_forward_tokens must be an int >= 1, got True"),
        ("failover_timeout", -0.1, "failover_timeout must be a finite number >= 0, got -0.1"),
        ("ban_base", 0.0, "ban_base must be a finite number > 0, got 0.0"),
        ("ban_factor", 0.5, "ban_factor must be a finite number >= 1, got 0.5"),
        ("ban_cap", 0.5, "ban_cap must be >= ban_base, got 0.5"),
        ("refresh_period", 0.0, "refresh_period must be None or a finite number > 0, got 0.0"),
        ("refresh_timeout", 0, "refresh_timeout must be a finite number > 0, got 0"),
        (
            "min_refresh_interval",
            -1,
            "min_refresh_interval must be a finite number >= 0, got -1",
        ),
        (
            "activation_dtype",
            "int8",
            "activation_dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int8'",
        ),
        ("compression", "zip", "compression must be None or one of"),
    ],
)
def test_invalid_values_name_the_field_the_rule_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClientConfig(**{field: value})


def test_defaults_and_valid_combinations():
    config = ClientConfig()
    assert config.step_timeout == 30.0 and config.max_retries == 5
    ClientConfig(activation_dtype="bfloat16", compression="bfloat16", refresh_period=None)
    with pytest.raises(ValueError, match="compression must be None or one of"):
        ClientConfig(activation_dtype="bfloat16", compression="float16")


def test_import_distllm_is_torch_free_and_client_is_lazy():
    code = (
        "import sys, distllm\n"
        "assert 'torch' not in sys.modules, 'import distllm imported torch'\n"
        "import distllm.client.planner, distllm.client.routes, distllm.client.config\n"
        "assert 'torch' not in sys.modules, 'the routing cores imported torch'\n"
        "assert distllm.Client.__name__ == 'Client' and 'torch' in sys.modules\n"
        "assert distllm.NoRouteError is distllm.client.errors.NoRouteError\n"
        "from distllm import ClientConfig, RouteFailedError\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
