"""The README's demo (benchmarks/demo.py) runs and prints its table (one short epoch here)."""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")
# benchmarks/ goes on sys.path only while the demo is imported: left there, its kernels.py would shadow
# the optional `kernels` package that transformers probes for, and run the kernels benchmark's
# single-thread setup (NUMBA_NUM_THREADS=1) inside the test process.
_saved = list(sys.path)
sys.path.insert(0, BENCHMARKS)
try:
    import demo  # noqa: E402
finally:
    sys.path[:] = _saved


def test_demo_prints_table(capsys):
    results = demo.main(["--epochs", "1", "--strategies", "uniform", "gradmatch", "--threads", "keep"])
    out = capsys.readouterr().out
    assert "strategy" in out and "select %" in out and "speed-up" in out
    assert out.index("selection kernels ready") < out.index("full: done")  # no run's time includes a Numba compile
    assert "compiling (once on a machine" in out and "torch threads:" in out
    verdict = next(line for line in out.splitlines() if line.startswith("Verdict: "))
    assert "faster than full backprop" in verdict and "One seed on a tiny model cannot tell" in verdict
    assert [r.strategy for r in results] == ["full", "uniform", "gradmatch"]
    full, uniform, gm = results
    assert full.samples_backprop == full.samples_seen == 1438
    assert full.selection_s == 0.0  # full training runs no scoring pass
    assert uniform.samples_backprop == gm.samples_backprop < 0.3 * full.samples_backprop
    assert all(0.0 <= r.accuracy <= 1.0 for r in results)


def test_benchmarks_leave_sys_path_alone():
    assert BENCHMARKS not in sys.path
