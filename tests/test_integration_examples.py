"""The Lightning and HF Trainer examples run on CPU on shipped data (short runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


#: multi-process, example or benchmark runs: `python -m pytest -q -m slow` (CI runs it)
pytestmark = pytest.mark.slow


def run(script, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def test_lightning_example():
    need("lightning.pytorch")
    row = run("examples/lightning_digits.py", "--strategy", "sb", "--fraction", "0.25", "--epochs", "3")
    assert row["samples_seen"] == 3 * 1437 and row["steps"] == 3 * 23  # 1437 / 64: 23 batches an epoch
    assert row["samples_backprop"] == 3 * (22 * 16 + 8)  # ceil(0.25 * 64) per batch, ceil(0.25 * 29) of the last
    assert row["test_acc"] > 0.5


def test_hf_trainer_example():
    need("transformers")
    row = run("examples/hf_trainer_digits.py", "--strategy", "uniform", "--fraction", "0.5", "--epochs", "2")
    assert row["samples_seen"] == 2 * 1437 and row["optimizer_steps"] == 2 * 23  # 45 batches of 32, accumulate 2
    assert row["samples_backprop"] == 2 * (44 * 16 + 15)  # ceil(0.5 * 29) of the last
    assert row["test_acc"] > 0.2
