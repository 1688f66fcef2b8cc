"""Every state the library saves loads with ``torch.load(weights_only=True)``, resumes exactly, is checked on load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sbsampler as sb

B = 16


def _roundtrip(state):
    """``torch.save`` then ``torch.load`` with torch's safe unpickler (refuses NumPy and any other object)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(strategy, rebatch, **kw):
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    batches = [(x[i:i + 20], y[i:i + 20], torch.arange(i, i + 20)) for i in range(0, len(x), 20)]
    return sb.SelectiveLoader(batches, sb.ScoringHook(model), strategy, fraction=0.3, rebatch=rebatch,
                              batch_size=B, seed=4, **kw)


def _steps(loader, epochs=2, stop=None):
    out = []
    for _ in range(epochs):
        for step in loader:
            out.append((step.indices.tolist(), [round(w, 7) for w in step.weights.tolist()]))
            if stop is not None and len(out) == stop:
                return out
    return out


STRATEGIES = [("uniform", {}), ("topk", {}), ("sb", {}), ("sb", {"mode": "bernoulli"}), ("sb", {"unbiased": True}),
              ("composer", {}), ("gradmatch", {}), ("importance", {}), ("infobatch", {}), ("full", {})]


@pytest.mark.parametrize("rebatch", [False, True])
@pytest.mark.parametrize("name,kwargs", STRATEGIES, ids=[n + "".join(f"-{v}" for v in k.values())
                                                          for n, k in STRATEGIES])
def test_loader_state_loads_safely_and_resumes_exactly(name, kwargs, rebatch):
    def make():
        return _loader(sb.STRATEGIES[name](**kwargs, seed=4), rebatch)

    full = _steps(make())
    stop = len(full) // 2 + 1  # mid epoch 1 (a queue in flight when rebatching)
    first = make()
    done = _steps(first, stop=stop)
    state = _roundtrip(first.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for step in resumed:  # the interrupted epoch ...
        rest.append((step.indices.tolist(), [round(w, 7) for w in step.weights.tolist()]))
    epochs_left = 2 - resumed.next_epoch
    rest += _steps(resumed, epochs=epochs_left)  # ... and any left
    assert done + rest == full


def test_loader_state_on_the_device_path_loads_safely():
    loader = _loader("sb", True, select_on="device")
    _steps(loader, stop=3)
    state = _roundtrip(loader.state_dict())
    assert set(state["strategy"]["device_rng"]) == {"cpu"}


def test_store_and_sampler_states_load_safely_and_resume():
    store = sb.ScoreStore(100)
    rng = np.random.default_rng(0)
    store.update(np.arange(100), rng.exponential(size=100), rng.random(100), epoch=0)
    sampler = sb.SelectiveSampler(store, "sb", fraction=0.3, seed=2)
    sampler.set_epoch(1)
    first = list(sampler)
    store2, sampler2 = sb.ScoreStore(100), sb.SelectiveSampler(sb.ScoreStore(100), "sb", fraction=0.3, seed=9)
    store2.load_state_dict(_roundtrip(store.state_dict()))
    sampler2.store = store2
    sampler2.load_state_dict(_roundtrip(sampler.state_dict()))
    assert list(sampler2) == first
    np.testing.assert_array_equal(store2.loss, store.loss)


def test_batch_selector_state_loads_safely():
    x, y = _data(32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    sel = sb.BatchSelector(sb.ScoringHook(model), "sb", fraction=0.25, seed=0)
    sel((x, y))
    other = sb.BatchSelector(sb.ScoringHook(model), "sb", fraction=0.25, seed=5)
    other.load_state_dict(_roundtrip(sel.state_dict()))
    assert sel((x, y)).indices.tolist() == other((x, y)).indices.tolist()


@pytest.mark.parametrize("name", sorted(sb.STRATEGIES))
def test_strategy_states_load_safely(name):
    s = sb.get_strategy(name, seed=0)
    s.observe(np.arange(5.0))
    _roundtrip(s.state_dict())


def test_stateful_wrapped_loader_state_loads_safely():
    pytest.importorskip("torchdata")
    from torchdata.stateful_dataloader import StatefulDataLoader

    x, y = _data()
    ds = sb.with_indices(TensorDataset(x, y))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    loader = sb.SelectiveLoader(StatefulDataLoader(ds, batch_size=20, shuffle=True), sb.ScoringHook(model),
                                "infobatch", fraction=0.3, rebatch=True, batch_size=B, seed=1)
    _steps(loader, stop=2)
    _roundtrip(loader.state_dict())


# -- what load_state_dict refuses, leaving the object as it was ---------------------------------------------------

def _same_state(a, b) -> bool:
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(a, buf_a)
    torch.save(b, buf_b)
    return buf_a.getvalue() == buf_b.getvalue()


def _mid_epoch_loader_state():
    loader = _loader("sb", True)
    _steps(loader, stop=2)
    return _roundtrip(loader.state_dict())


def _corrupt(state, path, value):
    state = _roundtrip(state)
    *parents, last = path
    target = state
    for key in parents:
        target = target[key]
    target[last] = value
    return state


@pytest.mark.parametrize("path,value,match", [
    (("version",), 99, "unknown SelectiveLoader state version 99"),
    (("strategy", "strategy"), "ComposerRule", "saved with strategy 'ComposerRule'"),
    (("strategy", "rng"), {"bit_generator": "PCG64"}, "'rng' is not a PCG64 state"),
    (("strategy", "history"), torch.zeros(3, 2), "'history' must have 1 dimension"),
    (("position",), 40, "saved after 40 batches of its epoch, but the wrapped loader has 8"),
    (("queue", 0, "multipliers"), torch.ones(1), r"'queue\[0\].multipliers' has 1 entries"),
    (("queue", 0, "rows"), torch.ones(3), r"'queue\[0\].rows' must hold integers"),
    (("stats", "samples_sen"), 3, r"unknown counters \['samples_sen'\]"),
    (("batch_size",), 0, "'batch_size' must be a positive int"),
])
def test_loader_refuses_a_mismatched_state_and_changes_nothing(path, value, match):
    state = _mid_epoch_loader_state()
    assert state["queue"], "a queue is in flight"
    bad = _corrupt(state, path, value)
    loader = _loader("sb", True)
    _steps(loader, stop=1)
    before = loader.state_dict()
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(bad)
    assert _same_state(loader.state_dict(), before)


def test_store_refuses_another_dataset_and_bad_arrays_unchanged():
    store = sb.ScoreStore(10)
    store.update(np.arange(10), np.linspace(0.1, 1, 10), epoch=0)
    state = _roundtrip(store.state_dict())
    with pytest.raises(ValueError, match="holds 10 samples, this store 12: it comes from another dataset"):
        sb.ScoreStore(12).load_state_dict(state)
    other = sb.ScoreStore(10)
    before = other.state_dict()
    with pytest.raises(ValueError, match="'scored_epoch' must hold integers"):
        other.load_state_dict({**state, "scored_epoch": state["scored_epoch"].double()})
    with pytest.raises(ValueError, match="'loss' has 9 entries, expected 10"):
        other.load_state_dict({**state, "loss": state["loss"][:9]})
    with pytest.raises(ValueError, match="unknown ScoreStore state version 7"):
        other.load_state_dict({**state, "version": 7})
    assert _same_state(other.state_dict(), before)


def test_sampler_refuses_another_strategy_or_dataset():
    store = sb.ScoreStore(50)
    store.update(np.arange(50), np.random.default_rng(0).exponential(size=50), epoch=0)
    sampler = sb.SelectiveSampler(store, "sb", fraction=0.3, seed=2)
    sampler.set_epoch(1)
    list(sampler)
    state = _roundtrip(sampler.state_dict())
    with pytest.raises(ValueError, match="strategy 'SelectiveBackprop', this SelectiveSampler has 'Uniform'"):
        sb.SelectiveSampler(store, "uniform", fraction=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match="planned over 50 samples, this sampler's store holds 40"):
        sb.SelectiveSampler(sb.ScoreStore(40), "sb", fraction=0.3).load_state_dict(state)


def test_strategy_and_selector_refuse_another_strategy():
    with pytest.raises(ValueError, match="saved with strategy 'Uniform', this TopK has 'TopK'"):
        sb.TopK().load_state_dict(_roundtrip(sb.Uniform(seed=0).state_dict()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    state = _roundtrip(sb.BatchSelector(sb.ScoringHook(model), "sb", seed=0).state_dict())
    with pytest.raises(ValueError, match="saved with strategy 'SelectiveBackprop'"):
        sb.BatchSelector(sb.ScoringHook(model), "infobatch").load_state_dict(state)


def test_states_of_earlier_versions_still_load():
    """A version-3 loader state (NumPy arrays, a strategy state without version or class) resumes as before."""
    loader = _loader("sb", True)
    _steps(loader, stop=3)
    state = loader.state_dict()
    old = {**state, "version": 3,
           "strategy": {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["strategy"].items()
                        if k not in ("version", "strategy", "device_rng")},
           "queue": [{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in e.items()}
                     for e in state["queue"]]}
    fresh = _loader("sb", True)
    fresh.load_state_dict(old)
    fresh2 = _loader("sb", True)
    fresh2.load_state_dict(state)
    assert _steps(fresh, epochs=1) == _steps(fresh2, epochs=1)
