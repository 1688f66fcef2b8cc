"""Issue 26 item 2: the loaders estimate the time selection saves against full training from the measured scoring
and step costs, and warn once (SelectionCostWarning) when it costs more than it saves."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.saving import StepCosts
from sbsampler.stats import LoaderStats, SelectionCostWarning, read_stats


class Paced(nn.Module):
    """A linear model whose no-graph (scoring) forward sleeps ``score_s`` per batch."""

    def __init__(self, score_s: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.score_s = score_s

    def forward(self, x):
        if not torch.is_grad_enabled():
            time.sleep(self.score_s)
        return self.fc(x)


def data(n=256):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=16)


def run_epoch(loader, model, step_s):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for b in loader:
        loss = sb.weighted_loss(F.cross_entropy(model(b.inputs), b.targets, reduction="none"), b.weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(step_s * len(b) / 16)  # a step that costs in proportion to its rows


def _stats(steps, seen, batches, scoring):
    """LoaderStats of ``steps`` timed steps ``(rows, seconds)`` over ``batches`` batches of ``seen`` samples."""
    s = LoaderStats(samples_seen=seen, batches_seen=batches, time_scoring=scoring, steps=len(steps),
                    samples_yielded=sum(r for r, _ in steps))
    for rows, seconds in steps:
        s.record_step(rows, seconds)
    return s


def test_steps_of_one_size_give_a_range_between_a_fixed_and_a_proportional_step():
    """A whole batch's step is not measured: with steps of one size it costs between the timed step (all fixed) and
    that step scaled to the batch's rows (all per row, the old single figure, which overstated the saving)."""
    s = _stats([(12, 0.125)] * 20, seen=1000, batches=20, scoring=4.0)
    est = s.saving_estimate()
    assert est.low == pytest.approx(20 * 0.125 - 2.5 - 4.0)
    assert est.high == pytest.approx(20 * 0.125 * 50 / 12 - 2.5 - 4.0)
    assert est.point is None and s.estimated_time_saved is None and s.estimated_saving is None
    assert "steps of 12 rows only" in est.basis
    d = s.as_dict()
    assert d["estimated_time_saved"] is None and d["estimated_time_saved_high"] == pytest.approx(est.high)
    assert s.break_even_fraction == pytest.approx(1 - (4.0 / 1000) / (0.125 / 12))  # the mean step per row


def test_steps_of_several_sizes_pin_a_whole_batch_and_give_a_point():
    """Steps of 5 and 100 rows costing exactly 10 ms + 2 ms a row: the fit finds the whole batch's 210 ms; the range
    allows the 15% drift for the 20 batches not stepped whole, and is narrow enough for a point."""
    steps = [(5, 0.010 + 0.002 * 5)] * 20 + [(100, 0.010 + 0.002 * 100)] * 10
    s = _stats(steps, seen=3000, batches=30, scoring=0.5)
    est = s.saving_estimate()
    want = 30 * 0.210 - sum(t for _, t in steps) - 0.5
    drift = 0.15 * 0.210 * 20  # DRIFT on the untimed whole-batch steps
    assert est.point == pytest.approx(want, rel=1e-6) and s.estimated_time_saved == pytest.approx(want, rel=1e-6)
    total = sum(t for _, t in steps)
    proportional = 30 * (total / 30) * 100 / (sum(r for r, _ in steps) / 30) - total - 0.5  # caps the range
    assert est.low == pytest.approx(want - drift, rel=1e-6) and est.high == pytest.approx(min(want + drift,
                                                                                              proportional), rel=1e-6)
    assert s.estimated_saving == pytest.approx(want / (30 * 0.210), rel=1e-6)
    assert s.break_even_fraction == pytest.approx(1 - (0.5 / 3000) / 0.002, rel=1e-6)  # the fitted cost per row
    assert "fitted as 10 ms + 2e+03 µs per row over 30 steps of 5-100 rows" in est.basis
    assert "estimated time saved against training on everything" in str(s)
    small = _stats([(12, 0.010 + 0.002 * 12)] * 20 + [(50, 0.110)] * 10, seen=1500, batches=30, scoring=0.5)
    assert small.saving_estimate().point is None  # a saving small against the drift: a range only


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.floats(1e-5, 1.0)), min_size=8, max_size=40))
def test_the_step_fit_is_least_squares_with_a_fixed_and_a_per_row_cost_that_are_not_negative(steps):
    """A step costs ``a + b rows`` with ``a, b >= 0``: the fit is scipy's non-negative least squares on the steps (a
    noisy run whose steps cost less with more rows printed '5.79 ms + -37.3 µs per row')."""
    from scipy.optimize import nnls

    costs = StepCosts()
    for rows, seconds in steps:
        costs.add(rows, seconds)
    fitted = costs.fit()
    if len({r for r, _ in steps}) == 1:
        assert fitted is None
        return
    a, b, residual, _ = fitted
    assert a >= 0 and b >= 0
    design = np.array([[1.0, r] for r, _ in steps])
    times = np.array([t for _, t in steps])
    (a_ref, b_ref), _ = nnls(design, times)
    sse = lambda a_, b_: float(((times - a_ - b_ * design[:, 1]) ** 2).sum())  # noqa: E731
    assert sse(a, b) <= sse(a_ref, b_ref) + 1e-9 * max(1.0, float((times ** 2).sum()))
    assert residual == pytest.approx(sse(a, b) / (len(steps) - 2), rel=1e-6, abs=1e-12)


def test_steps_that_cost_less_with_more_rows_print_no_negative_cost():
    s = _stats([(8, 0.010)] * 30 + [(16, 0.008)] * 33, seen=4000, batches=63, scoring=0.4)
    est = s.saving_estimate()
    assert "fitted as 8.95 ms + 0 µs per row over 63 steps" in est.basis and "+ -" not in est.basis
    assert est.low <= est.high


def test_the_break_even_fraction_reads_the_fitted_cost_per_row_only_where_the_steps_pin_it():
    """Steps of 26-32 rows with noisy times hardly tell the per-row cost from the fixed one: two identical runs of the
    getting-started loop said 'break-even fraction: none' and '0.53'. Where the fitted slope is within two of its
    standard errors of 0, the fraction reads the mean step per row (an upper bound, as the sentence says)."""
    rng = np.random.default_rng(2)  # a slope of 17 µs a row, its standard error 20
    rows = rng.integers(26, 33, size=24)
    steps = [(int(r), 0.0006 + 0.0002 * rng.standard_normal()) for r in rows]
    s = _stats(steps, seen=3000, batches=24, scoring=0.02)
    _, b, residual, sxx = s.steps_timed.fit()
    assert 0 < b < 2 * (residual / sxx) ** 0.5  # the slope is noise here
    mean_per_row = sum(t for _, t in steps) / sum(r for r, _ in steps)
    assert s.break_even_fraction == pytest.approx(1 - (0.02 / 3000) / mean_per_row)


def test_old_states_still_load_and_the_counters_print_as_lines():
    assert LoaderStats().estimated_time_saved is None and LoaderStats().as_dict()["estimated_saving"] is None
    old = LoaderStats().state()
    del old["time_training"], old["steps_timed"]  # a state saved before these counters existed still loads
    loaded = read_stats(old, "SelectiveLoader")
    assert loaded.time_training == 0.0 and loaded.steps_timed.n == 0
    with pytest.raises(ValueError, match="steps_timed"):
        read_stats({**LoaderStats().state(), "steps_timed": [1, 2]}, "SelectiveLoader")
    with pytest.raises(ValueError, match="whole counts"):
        read_stats({**LoaderStats().state(), "steps_timed": [1.5] + [0] * 8}, "SelectiveLoader")
    s = _stats([(12, 0.125)] * 20, seen=1000, batches=20, scoring=4.0)
    lines = str(s).splitlines()
    assert len(lines) == 5 and lines[0].startswith("kept 24%: 240 of 1,000 samples seen back-propagated, in 20 steps")
    assert lines[1].startswith("time: loading 0 s, scoring 4 s") and "-4 to +3.92 s" in lines[2]
    assert lines[3].startswith("  (steps of 12 rows only") and lines[4].startswith("break-even fraction:")
    assert str(LoaderStats()) == "no sample seen yet"


def test_the_point_of_a_primed_run_is_within_a_quarter_of_the_saving_it_made(monkeypatch):
    """A primed epoch gives whole-batch steps: the estimate then names a point, and the steps it models (1 ms + 2 ms
    a row) make the true saving known. The loader's clock is a fake that only the steps advance, so the machine's
    load cannot move the figures (it did, with real sleeps)."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    model = Paced(score_s=0.0)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "uniform", fraction=0.25, seed=0, prime=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        for b in loader:
            sb.weighted_loss(F.cross_entropy(model(b.inputs), b.targets, reduction="none"), b.weights).backward()
            opt.step()
            now[0] += 0.001 + 0.002 * len(b)
    assert loader.stats.selection_time == 0
    est = loader.stats.saving_estimate()
    truth = 16 * 0.002 * 12 - loader.stats.selection_time  # 16 selective steps of 4 rows instead of 16
    assert est.point is not None and abs(est.point - truth) <= 0.25 * abs(truth)
    assert est.low <= truth <= est.high


def test_a_loader_warns_once_when_scoring_costs_more_than_it_saves():
    model = Paced(score_s=0.01)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "sb", fraction=0.75, seed=0)
    with pytest.warns(SelectionCostWarning, match="costs more than it saves.*keep fewer than|no fraction pays"):
        run_epoch(loader, model, step_s=0.002)
    assert loader.stats.saving_estimate().high < 0 and loader.stats.time_training > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epoch(loader, model, step_s=0.002)  # once only


def test_a_loader_is_silent_where_selection_pays():
    model = Paced(score_s=0.0)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "sb", fraction=0.25, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionCostWarning)
        run_epoch(loader, model, step_s=0.01)
    assert loader.stats.saving_estimate().high > 0
    assert 0.25 < loader.stats.break_even_fraction <= 1


def test_batch_selector_warns_at_the_epoch_end_and_not_across_the_gap():
    model = Paced(score_s=0.01)
    sel = sb.BatchSelector(sb.ScoringHook(model), "sb", 0.75, seed=0)
    for x, y in data():
        sel((x, y))
        time.sleep(0.001)
    time.sleep(0.3)  # an evaluation between epochs: not a step
    with pytest.warns(SelectionCostWarning, match="BatchSelector"):
        sel.epoch_end()
    assert sel.stats.time_training < 0.2
    pays = sb.BatchSelector(sb.ScoringHook(Paced(0.0)), "sb", 0.25, seed=0)
    for x, y in data():
        pays((x, y))
        time.sleep(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionCostWarning)
        pays.epoch_end()


def test_full_backprop_through_the_loader_never_warns():
    """Issue 34: the demo's full-backprop run warned that selection 'saved at most -1.11e-16 s' (0 s of selection,
    nothing skipped, rounding): keeping everything without scoring costs nothing to warn about."""
    import random

    rng = random.Random(0)
    for _ in range(200):  # epochs of full batches and a last short one, steps of random lengths
        n = rng.randint(10, 40)
        steps = [(64, rng.uniform(0.001, 0.02)) for _ in range(n - 1)] + [(rng.randint(1, 64), 0.01)]
        s = _stats(steps, seen=sum(r for r, _ in steps), batches=n, scoring=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SelectionCostWarning)
            assert not s.warn_if_costly(), s.saving_estimate()
    model = Paced(score_s=0.0)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "full", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionCostWarning)
        for _ in range(3):
            run_epoch(loader, model, step_s=0.0)
