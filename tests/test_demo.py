"""The README's demo (benchmarks/demo.py) runs and prints its table (one short epoch here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import demo  # noqa: E402


def test_demo_prints_table(capsys):
    results = demo.main(["--epochs", "1", "--strategies", "uniform", "gradmatch"])
    out = capsys.readouterr().out
    assert "strategy" in out and "select %" in out
    assert out.index("kernels warmed up") < out.index("full: done")  # no run's time includes a Numba compile
    assert [r.strategy for r in results] == ["full", "uniform", "gradmatch"]
    full, uniform, gm = results
    assert full.samples_backprop == full.samples_seen == 1438
    assert full.selection_s == 0.0  # full training runs no scoring pass
    assert uniform.samples_backprop == gm.samples_backprop < 0.3 * full.samples_backprop
    assert all(0.0 <= r.accuracy <= 1.0 for r in results)
