"""Issue 26 item 2: the loaders estimate the time selection saves against full training from the measured scoring
and step costs, and warn once (SelectionCostWarning) when it costs more than it saves."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
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


def test_the_arithmetic_of_the_estimate():
    s = LoaderStats(samples_seen=1000, samples_yielded=250, time_training=2.5, time_scoring=4.0, steps=20)
    assert s.step_time_per_sample == pytest.approx(0.01)
    assert s.estimated_time_saved == pytest.approx(750 * 0.01 - 4.0)
    assert s.estimated_saving == pytest.approx(3.5 / 10.0)
    assert s.break_even_fraction == pytest.approx(1 - 0.004 / 0.01)
    d = s.as_dict()
    assert d["estimated_time_saved"] == pytest.approx(3.5) and d["estimated_saving"] == pytest.approx(0.35)
    assert LoaderStats().estimated_time_saved is None and LoaderStats().as_dict()["estimated_saving"] is None
    old = {k: v for k, v in LoaderStats().as_dict().items() if k in LoaderStats.__dataclass_fields__}
    old["residuals"] = []
    del old["time_training"]  # a state saved before the counter existed still loads
    assert read_stats(old, "SelectiveLoader").time_training == 0.0


def test_a_loader_warns_once_when_scoring_costs_more_than_it_saves():
    model = Paced(score_s=0.01)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "sb", fraction=0.75, seed=0)
    with pytest.warns(SelectionCostWarning, match="costs more than it saves.*keep fewer than|no fraction pays"):
        run_epoch(loader, model, step_s=0.002)
    assert loader.stats.estimated_time_saved < 0 and loader.stats.time_training > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epoch(loader, model, step_s=0.002)  # once only


def test_a_loader_is_silent_where_selection_pays():
    model = Paced(score_s=0.0)
    loader = sb.SelectiveLoader(data(), sb.ScoringHook(model), "sb", fraction=0.25, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionCostWarning)
        run_epoch(loader, model, step_s=0.01)
    assert loader.stats.estimated_time_saved > 0
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
