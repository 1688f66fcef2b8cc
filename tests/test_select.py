"""The functional step (select_batch), full training as a strategy, and what strategies declare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sbsampler as sb
from sbsampler.schedule import in_window

DIM, C = 6, 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, C))


def _xy(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DIM, generator=g), torch.randint(0, C, (b,), generator=g)


def test_select_batch_gives_the_loaders_step():
    x, y = _xy()
    hook = sb.ScoringHook(_model())
    picked = sb.select_batch(hook, sb.TopK(), (x, y), 0.25)
    sub = picked.sub
    assert len(sub) == 4 and picked.distinct == 4 and picked.rows.tolist() == sub.indices.tolist()
    top = torch.argsort(hook.score(x, y).loss, descending=True)[:4].sort().values
    assert sub.indices.tolist() == top.tolist()  # without indices in the batch: positions
    torch.testing.assert_close(sub.inputs, x[top])
    torch.testing.assert_close(sub.weights, torch.full((4,), 0.25))
    # the same step through the loader, one batch
    (step,) = list(sb.SelectiveLoader([(x, y)], hook, sb.TopK(), fraction=0.25))
    assert step.indices.tolist() == sub.indices.tolist()
    torch.testing.assert_close(step.weights, sub.weights)


def test_select_batch_nan_skip_and_empty():
    x, y = _xy()
    x[3] = float("nan")
    picked = sb.select_batch(sb.ScoringHook(_model()), "topk", (x, y, torch.arange(100, 116)), 1.0,
                             nan_policy="skip", rng=0)
    assert picked.skipped == 1 and 103 not in picked.sub.indices.tolist() and len(picked.sub) == 15
    with pytest.raises(ValueError, match=r"dataset indices \[103\]"):
        sb.select_batch(sb.ScoringHook(_model()), "topk", (x, y, torch.arange(100, 116)), 0.5)
    # uniform reads no scores, so no scoring pass looks at the losses: the step's own loss shows a NaN
    assert len(sb.select_batch(sb.ScoringHook(_model()), "uniform", (x, y), 0.5).sub) == 8
    with pytest.raises(ValueError, match="nan_policy"):
        sb.select_batch(sb.ScoringHook(_model()), "uniform", _xy(), 0.5, nan_policy="ignore")
    empty = sb.select_batch(sb.ScoringHook(_model()), "uniform", (x[:0], y[:0]), 0.5)
    assert empty.sub is None and empty.rows.numel() == 0


def test_full_is_a_strategy_with_no_scoring_pass():
    x, y = _xy()
    picked = sb.select_batch(None, "full", (x, y))  # no hook needed: Full reads no scores (nor a fraction)
    assert picked.scores is None and picked.sub.inputs is x and len(picked.sub) == 16
    torch.testing.assert_close(picked.sub.weights, torch.full((16,), 1 / 16))
    assert isinstance(sb.get_strategy(None), sb.Full) and isinstance(sb.get_strategy("full"), sb.Full)
    with pytest.raises(TypeError, match="reads scores"):
        sb.select_batch(None, "topk", (x, y), 0.5)
    assert len(sb.select_batch(None, "uniform", (x, y), 0.5).sub) == 8  # nor does uniform
    loader = sb.SelectiveLoader([(x, y), _xy(seed=1)], sb.ScoringHook(_model()), strategy=None, rebatch=True)
    assert [len(b) for b in loader] == [16, 16] and len(loader) == 2  # whole batches, never rebatched
    assert loader.stats.samples_scored == 0 and loader.stats.samples_yielded == 32


def test_rng_argument_leaves_the_strategys_own_rng_alone():
    scores = sb.ScoringHook(_model()).score(*_xy())
    s = sb.Uniform(seed=3)
    before = s.state_dict()
    a = s.select(scores, 5, rng=np.random.default_rng(9))
    b = s.select(scores, 5, rng=9)
    assert a.indices.tolist() == b.indices.tolist()
    assert s.state_dict() == before
    assert s.select(scores, 5).indices.tolist() == sb.Uniform(seed=3).select(scores, 5).indices.tolist()


def test_select_does_not_change_a_loss_history():
    """History is the driver's business: SelectiveLoader shows each round's losses through observe()."""
    s = sb.SelectiveBackprop(history=100, seed=0)
    loss = torch.linspace(0, 1, 20, dtype=torch.float64)
    s.select(sb.Scores(loss=loss), 5)
    assert s.recent_losses().size == 0
    x, y = _xy()
    loader = sb.SelectiveLoader([(x, y), _xy(seed=1)], sb.ScoringHook(_model()), s, fraction=0.5)
    list(loader)
    assert s.recent_losses().size == 32  # both rounds observed once each


def test_bernoulli_selective_backprop_is_its_own_class():
    s = sb.SelectiveBackprop(beta=2.0, mode="bernoulli", seed=1)
    assert type(s) is sb.BernoulliSelectiveBackprop and isinstance(s, sb.SelectiveBackprop)
    assert s.mode == "bernoulli" and s.variable_count and not sb.SelectiveBackprop.variable_count
    assert sb.BernoulliSelectiveBackprop.variable_count and sb.BernoulliSelectiveBackprop().mode == "bernoulli"
    assert type(sb.SelectiveBackprop(mode="fixed")) is sb.SelectiveBackprop
    with pytest.raises(ValueError, match="mode"):
        sb.BernoulliSelectiveBackprop(mode="fixed")


def test_strategies_declare_what_they_need():
    facts = {name: (cls.needs_scores, cls.needs_gradients, cls.works_from_stored, cls.keeps_history,
                    cls.variable_count, cls.keeps_all) for name, cls in sb.STRATEGIES.items()}
    assert facts == {
        "uniform": (False, False, True, False, False, False),
        "topk": (True, False, True, False, False, False),
        "sb": (True, False, True, True, False, False),
        "composer": (True, False, True, False, False, False),
        "gradmatch": (True, True, False, False, False, False),
        "importance": (True, True, True, False, False, False),
        "infobatch": (True, False, True, False, True, False),
        "full": (False, False, True, False, False, True),
    }
    assert {n: c.sampler_scale for n, c in sb.STRATEGIES.items()} == {
        n: "epoch" if n == "infobatch" else "step" for n in sb.STRATEGIES}


def test_in_window_and_local_sync():
    assert in_window(0.5, 0.5, 0.75) and not in_window(0.75, 0.5, 0.75) and in_window(None, 0.5, 0.6)
    sync = sb.distributed.LocalSync()
    assert sync.min_max([3, 1]) == ([3, 1], [3, 1]) and (sync.rank, sync.world_size) == (0, 1)
    np.testing.assert_array_equal(sync.all_gather_1d(np.array([1.0, 2.0])), [1.0, 2.0])


def test_uniform_runs_no_scoring_forward():
    """Uniform reads no scores: the loader never runs the scoring forward for it, and draws as before."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    loader = sb.SelectiveLoader(DataLoader(ds, batch_size=16), sb.ScoringHook(model), "uniform", 0.25, seed=3)
    picked = [b.indices.tolist() for b in loader]
    assert calls == [] and loader.stats.samples_scored == 0 and loader.stats.samples_selected == 16
    rng = np.random.default_rng(3)
    assert picked == [sorted((16 * j + rng.choice(16, size=4, replace=False)).tolist()) for j in range(4)]


def test_the_first_selection_loads_its_kernels_outside_the_stage_clock(monkeypatch):
    """Issue 34: a fresh process's first selection loads the Numba kernels (about 0.5 s from the cache, 25 s to
    compile), which stats counted as selection time: the getting-started loop showed 0.7 s of selecting for 24
    batches and a break-even fraction read from it. The load now runs in ``Strategy.warm_up``, outside the clock;
    a fake clock that only the warm-up advances shows it is not counted."""
    import time

    import sbsampler.select as select

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(select, "_WARM", set())
    calls = []

    def slow_warm_up(self):
        calls.append(type(self).__name__)
        now[0] += 100.0

    monkeypatch.setattr(sb.SelectiveBackprop, "warm_up", slow_warm_up)
    model = nn.Linear(4, 3)
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    loader = sb.SelectiveLoader(data, sb.ScoringHook(model), "sb", fraction=0.25, seed=0)
    for _ in range(2):
        for b in loader:
            pass
    assert calls == ["SelectiveBackprop"]  # once per process and class
    assert loader.stats.selection_time < 100 and loader.stats.time_selecting == 0


def test_warm_up_loads_every_kernel_a_rule_runs_and_changes_nothing():
    import subprocess
    import sys

    code = """
import numpy as np, torch, sbsampler as sb
from sbsampler import kernels
s = sb.SelectiveBackprop(seed=0)
s.observe(torch.rand(8))
before = (s.rng.bit_generator.state, s.recent_losses())
s.warm_up()
assert s.rng.bit_generator.state == before[0] and np.array_equal(s.recent_losses(), before[1])
assert kernels.ecdf.signatures and kernels.self_ecdf.signatures and kernels.efraimidis_keys.signatures
sb.GradientMatching().warm_up()
assert kernels.omp_gram.signatures and kernels.nnls_gram.signatures
sb.RhoLoss(reference=np.zeros(4)).warm_up()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
