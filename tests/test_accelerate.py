"""accelerate: a SelectiveLoader over a prepared loader, 2 CPU processes (accelerate.debug_launcher)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need  # noqa: E402

need("accelerate")
HERE = Path(__file__).resolve().parent


#: multi-process, example or benchmark runs: `python -m pytest -q -m slow` (CI runs it)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy,rebatch,even", [("sb", False, False), ("infobatch", True, False),
                                                   ("uniform", False, True)])
def test_two_processes_step_together(tmp_path, strategy, rebatch, even):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    subprocess.run([sys.executable, str(HERE / "_accelerate_worker.py"), str(tmp_path), strategy, str(int(rebatch)),
                    str(int(even))], check=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0  # equal steps on both processes
    assert ranks[0]["syncs"] == ranks[1]["syncs"] > 0  # and the same optimizer steps under accumulate
    for r in ranks:
        assert r["rows"] == r["yielded"]  # every row trained on is counted; padding is weight 0
    assert ranks[0]["w"] == pytest.approx(ranks[1]["w"], abs=1e-6)  # the replicas stayed equal
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert seen == (2 * 160 if even else 2 * 150)  # even_batches repeats 10 samples per epoch
    if not even:
        assert ranks[0]["padded"] + ranks[1]["padded"] > 0 or strategy == "infobatch"
