"""The examples run as documented and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prompt_tuning_sentiment_learns_the_task() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "prompt_tuning_sentiment.py"), "--epochs", "4"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    losses = [float(x) for x in re.findall(r"epoch \d+: loss ([0-9.]+)", out)]
    assert len(losses) == 4, out
    assert losses[-1] < losses[0] / 4, out  # the loss falls
    before = int(re.search(r"accuracy before training: (\d+)%", out).group(1))  # type: ignore[union-attr]
    after = int(re.search(r"accuracy after training: +(\d+)%", out).group(1))  # type: ignore[union-attr]
    assert after >= 80 and after > before, out
