"""Issue 26: sb.compare, "does selection pay on my model?": the cost model and the recommendation on given costs,
one call on a small model (table, JSONL, PNG, recommendation), the preflight, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.compare import Mode, Point, Run, break_even, ideal_speedup, recommend, summarise

ROOT = Path(__file__).resolve().parent.parent
MODES = [Mode("full"), Mode("uniform 0.25", "uniform", 0.25), Mode("sb 0.25", "sb", 0.25)]


def run(mode, seed, curve, step, selection, seen=1000, rows=None, loading=0.0):
    """A run whose clock is given: ``curve`` of (wall, rows, epochs, score), steps of 25 rows."""
    curve = [Point(w, r // 25, r, e, score) for w, r, e, score in curve]
    wall = curve[-1].wall
    return Run(mode=mode, seed=seed, fraction=1.0, curve=curve, wall_s=wall, steps=10, samples_seen=seen,
               samples_backprop=rows if rows is not None else curve[-1].rows, time_loading=loading,
               time_selection=selection, time_step=step, weight_sum=1.0)


def full_runs(final=0.9, wall=10.0):
    return [run("full", s, [(0, 0, 0, 0.1), (wall / 2, 500, 0.5, final - 0.01), (wall, 1000, 1.0, final)],
                step=wall, selection=0.0) for s in (0, 1)]


def test_cost_model_arithmetic():
    assert break_even(0.25, 1.0) == pytest.approx(0.75)
    assert break_even(2.0, 1.0) < 0  # scoring a sample costs more than a step on it: nothing pays
    with pytest.raises(ValueError):
        break_even(0.1, 0.0)
    assert ideal_speedup(0.25, 0.25, 1.0) == pytest.approx(1 / 0.5)
    assert ideal_speedup(0.25, 0.0, 1.0, loading_per_sample=1.0, level="sampler") == pytest.approx(4.0)


def test_a_mode_that_reaches_the_target_sooner_is_recommended():
    runs = full_runs() + [run("uniform 0.25", s, [(0, 0, 0, 0.1), (3.0, 250, 1.0, 0.896)], step=2.5,
                              selection=0.2, rows=250) for s in (0, 1)]
    runs += [run("sb 0.25", s, [(0, 0, 0, 0.1), (8.0, 250, 1.0, 0.91)], step=2.5, selection=5.0, rows=250)
             for s in (0, 1)]
    rows, cost = summarise(runs, MODES)
    assert cost["target"] == pytest.approx(0.895)
    assert cost["step_per_sample_s"] == pytest.approx(0.01) and cost["break_even_mode"] == "sb 0.25"
    assert cost["break_even"] == pytest.approx(1 - 0.005 / 0.01)
    assert [r["time_to_target_s"] for r in rows] == [10.0, 3.0, 8.0]
    assert [r["steps_to_target"] for r in rows] == [40, 10, 10]
    assert rows[1]["speedup"] == pytest.approx(10 / 3) and rows[1]["kept"] == pytest.approx(0.25)
    rec = recommend(rows, cost)
    assert rec.mode == "uniform 0.25" and "70% less wall time" in rec.reason and "break-even fraction" in rec.reason


def test_full_training_is_recommended_when_nothing_pays():
    slow = full_runs() + [run("uniform 0.25", s, [(0, 0, 0, 0.1), (9.8, 250, 1.0, 0.9)], step=2.5, selection=0.1,
                              rows=250) for s in (0, 1)]
    rows, cost = summarise(slow, MODES[:2])
    rec = recommend(rows, cost)
    assert rec.mode is None and "less than the 5%" in rec.reason
    short = full_runs() + [run("uniform 0.25", 0, [(0, 0, 0, 0.1), (2.0, 250, 1.0, 0.95)], step=1, selection=0,
                               rows=250),
                           run("uniform 0.25", 1, [(0, 0, 0, 0.1), (2.0, 250, 1.0, 0.5)], step=1, selection=0,
                               rows=250)]
    rows, cost = summarise(short, MODES[:2])
    rec = recommend(rows, cost)  # one seed of two missed the target: not recommended
    assert rec.mode is None and "no selective mode reached" in rec.reason and rows[1]["reached"] == 1
    costly = full_runs() + [run("sb 0.25", s, [(0, 0, 0, 0.1), (2.0, 250, 1.0, 0.5)], step=2.5, selection=20.0,
                                rows=250) for s in (0, 1)]
    rows, cost = summarise(costly, [MODES[0], MODES[2]])
    assert cost["break_even"] < 0 and "no score-reading rule can save time" in recommend(rows, cost).reason
    late = [run("full", s, [(0, 0, 0, 0.1), (10.0, 1000, 1.0, 0.9 if s else 0.5)], step=10, selection=0)
            for s in (0, 1)]
    rec = recommend(*summarise(late, MODES[:1]))
    assert rec.mode is None and "too short" in rec.reason


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return TensorDataset(x[:1200], y[:1200]), TensorDataset(x[1200:], y[1200:])


TRAIN, TEST = digits()


def mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@torch.no_grad()
def held_out_accuracy(model):
    x, y = TEST.tensors
    return float((model(x).argmax(1) == y).float().mean())


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_one_call_prints_the_table_and_recommendation_and_writes_its_files(tmp_path):
    loader = DataLoader(TRAIN, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    result = sb.compare(model=mlp, train_loader=loader, evaluate=held_out_accuracy, optimizer=sgd, epochs=2,
                        strategy="sb", fractions=(0.25, 0.5), seeds=(0, 1), progress=False,
                        schedule=sb.schedule.cosine(2))
    names = ["full", "uniform 0.25", "sb 0.25", "sampler infobatch prune 0.75", "uniform 0.5", "sb 0.5",
             "sampler infobatch prune 0.5"]
    assert [r["mode"] for r in result.summary] == names
    assert len(result.runs) == 2 * len(names)
    full = [r for r in result.runs if r.mode == "full"]
    assert all(r.samples_backprop == 2 * 1200 and r.progress == pytest.approx(2.0) for r in full)
    assert all(len(r.curve) == 5 for r in full)  # start + 2 evaluations an epoch
    sb25 = next(r for r in result.summary if r["mode"] == "sb 0.25")
    assert sb25["kept"] == pytest.approx(0.25, abs=0.02) and sb25["selection_share"] > 0
    assert result.cost["break_even"] is not None and result.cost["break_even"] < 1
    assert result.recommendation == recommend(result.summary, result.cost)  # the logic tested above decides
    report = result.report()
    assert report.splitlines()[0].startswith("| mode | kept | final") and "Recommendation:" in report
    data, png = result.write(tmp_path)
    lines = data.read_text().splitlines()
    assert len(lines) == len(result.runs) + 1 and all(json.loads(ln) for ln in lines)
    assert json.loads(lines[-1])["recommendation"]["reason"] == result.recommendation.reason
    assert png.stat().st_size > 10_000


def test_a_wall_clock_budget_stops_each_run():
    loader = DataLoader(TRAIN, batch_size=32)
    slow = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731

    def paced(outputs, targets):
        time.sleep(0.005)
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    result = sb.compare(model=mlp, train_loader=loader, evaluate=held_out_accuracy, optimizer=slow, epochs=50,
                        seconds=0.3, modes=[Mode("full"), Mode("uniform 0.5", "uniform", 0.5)], loss=paced,
                        progress=False)
    for r in result.runs:
        assert r.wall_s < 1.5 and r.progress < 50


def test_the_preflight_fails_in_seconds_naming_the_mode():
    loader = DataLoader(TRAIN, batch_size=32)
    calls = []

    def mean_loss(outputs, targets):  # a reduced loss: no per-sample losses to select by
        calls.append(1)
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="preflight of mode 'full'.*one loss per sample"):
        sb.compare(model=mlp, train_loader=loader, evaluate=held_out_accuracy, optimizer=sgd, loss=mean_loss,
                   progress=False)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="first mode must be full"):
        sb.compare(model=mlp, train_loader=loader, evaluate=held_out_accuracy, optimizer=sgd,
                   modes=[Mode("uniform", "uniform", 0.5)], progress=False)
    with pytest.raises(RuntimeError, match="preflight of mode 'bad'"):
        sb.compare(model=mlp, train_loader=loader, evaluate=held_out_accuracy, optimizer=sgd, progress=False,
                   modes=[Mode("full"), Mode("bad", "gradmatch", 0.25, options={"no_such_option": 1})])


def test_the_command_line_names_missing_factories(tmp_path):
    script = tmp_path / "empty.py"
    script.write_text("def model():\n    return None\n")
    out = subprocess.run([sys.executable, "-m", "sbsampler.compare", str(script)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and "train_loader, evaluate, optimizer" in out.stderr
    assert "RuntimeWarning" not in out.stderr
