"""Every state the library saves loads with ``torch.load(weights_only=True)``, resumes exactly, is checked on load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sbsampler as sb
from sbsampler.strategies import fraction_for

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
    return sb.SelectiveLoader(batches, sb.ScoringHook(model), strategy,
                              fraction=fraction_for(strategy, 0.3), rebatch=rebatch,
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


@pytest.mark.parametrize("select_on", ["host", "device"])
@pytest.mark.parametrize("rebatch", [False, True])
@pytest.mark.parametrize("name,kwargs", STRATEGIES, ids=[n + "".join(f"-{v}" for v in k.values())
                                                          for n, k in STRATEGIES])
def test_loader_state_between_epochs_resumes_exactly(name, kwargs, rebatch, select_on):
    """A state saved between two epochs carried no samples per pick of the epoch before, so a variable-count rule's
    rebatched weights of the next epoch changed on resume (issue 22, item 5)."""
    strategy = sb.STRATEGIES[name](**kwargs, seed=4)
    if select_on == "device" and not strategy.selects_on_device:
        pytest.skip("chooses on the host only")

    def make():
        return _loader(sb.STRATEGIES[name](**kwargs, seed=4), rebatch, select_on=select_on)

    full = _steps(make(), epochs=3)
    first = make()
    done = _steps(first, epochs=1)
    state = _roundtrip(first.state_dict())
    assert state["in_epoch"] is False and state["next_epoch"] == 1
    resumed = make()
    resumed.load_state_dict(state)
    assert done + _steps(resumed, epochs=2) == full


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
                                "infobatch", rebatch=True, batch_size=B, seed=1)
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


DELETE = object()


def _first(value):
    """A change that sets the first entry of a saved array to ``value``."""
    def change(t):
        t = t.clone()
        t[0] = value
        return t
    return change


def _corrupt(state, path, value):
    state = _roundtrip(state)
    *parents, last = path
    target = state
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    elif callable(value):  # a change of the saved value
        target[last] = value(target[last])
    else:
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
    (("batch_size",), 0, "'batch_size' must be an int >= 1"),
    # issue 22: each of these loaded, half-loaded, or failed later deep in a resume
    (("next_epoch",), "abc", "'next_epoch' must be an int >= 0"),
    (("next_epoch",), 2.7, "'next_epoch' must be an int >= 0"),
    (("next_epoch",), -3, "'next_epoch' must be an int >= 0"),
    (("epoch",), None, "'epoch' must be an int >= 0"),
    (("in_epoch",), "yes", "'in_epoch' must be a bool"),
    (("queue", 0, "multipliers"), _first(float("nan")), "non-finite"),
    (("queue", 0, "multipliers"), _first(-1.0), "below its least value 0"),
    (("queue", 0, "per_pick"), _first(0.0), "must be > 0"),
    (("queue", 0, "rows"), _first(-1), "below its least value 0"),
    (("queue",), "abc", "'queue' must be a list"),
    (("stats", "samples_seen"), DELETE, r"lacks the counters \['samples_seen'\]"),
    (("stats", "steps"), -1, "'stats.steps' must be an int >= 0"),
    (("stats", "time_scoring"), float("nan"), "'stats.time_scoring' must be a finite number"),
    (("stats", "samples_seen"), 1000, "does not add up"),
    (("carried",), -2.0, "'carried' must be a finite number > 0"),
    (("drawn",), [3, "x"], r"'drawn\[1\]' must be a finite number"),
    (("drawn",), [3, 0.0], r"'drawn\[1\]' must be a finite number > 0"),
    (("batches",), 9, "with batches 9, this one has 8"),
    (("wrapped",), {"ffcv_epoch": -1}, "'wrapped.ffcv_epoch' must be an int >= 0"),
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


def _indexed_loader(n, strategy="sb", rebatch=True):
    x, y = _data(n)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    dl = torch.utils.data.DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=20)
    return sb.SelectiveLoader(dl, sb.ScoringHook(model), strategy,
                              fraction=fraction_for(strategy, 0.3), rebatch=rebatch, batch_size=B,
                              seed=4)


def test_a_mid_epoch_state_of_another_dataset_size_is_refused():
    """160 and 150 samples both make 8 batches of 20: the position fit, so the state loaded (issue 22)."""
    loader = _indexed_loader(160)
    _steps(loader, stop=2)
    state = _roundtrip(loader.state_dict())
    other = _indexed_loader(150)
    before = other.state_dict()
    with pytest.raises(ValueError, match="with dataset_size 160, this one has 150: it comes from another dataset"):
        other.load_state_dict(state)
    assert _same_state(other.state_dict(), before)
    _indexed_loader(160).load_state_dict(state)  # the same size loads


def test_queued_rows_beyond_the_batch_are_refused_on_load_or_named_on_resume():
    """Rows past the wrapped batch loaded and failed later with an IndexError deep in the resume (issue 22)."""
    loader = _indexed_loader(160)
    _steps(loader, stop=2)
    bad = _corrupt(loader.state_dict(), ("queue", 0, "rows"), _first(25))
    with pytest.raises(ValueError, match=r"'queue\[0\].rows' holds 25: it must be below 20"):
        _indexed_loader(160).load_state_dict(bad)
    listed = _loader("sb", True)  # a list of batches says no batch size: the resume names the row
    _steps(listed, stop=2)
    bad = _corrupt(listed.state_dict(), ("queue", 0, "rows"), _first(25))
    fresh = _loader("sb", True)
    fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"cannot resume: the saved queue holds row 25 of batch \d, which has 20"):
        next(iter(fresh))


def test_store_refuses_tampered_norms_and_epochs_unchanged():
    store = sb.ScoreStore(10)
    store.update(np.arange(10), np.linspace(0.1, 1, 10), np.linspace(1, 2, 10), epoch=0)
    state = _roundtrip(store.state_dict())
    other = sb.ScoreStore(10)
    before = other.state_dict()
    norms = state["grad_norm"].clone()
    norms[3] = -1.0
    with pytest.raises(ValueError, match="'grad_norm' holds -1, below its least value 0"):
        other.load_state_dict({**state, "grad_norm": norms})
    norms[3] = float("inf")
    with pytest.raises(ValueError, match="'grad_norm' holds infinite norms"):
        other.load_state_dict({**state, "grad_norm": norms})
    epochs = state["scored_epoch"].clone()
    epochs[0] = -5
    with pytest.raises(ValueError, match="'scored_epoch' holds -5, below its least value -1"):
        other.load_state_dict({**state, "scored_epoch": epochs})
    with pytest.raises(ValueError, match="'current_epoch' must be an int >= 0"):
        other.load_state_dict({**state, "current_epoch": None})
    assert _same_state(other.state_dict(), before)
    unknown = state["grad_norm"].clone()
    unknown[:] = float("nan")  # NaN: norms never measured, as a store updated with losses alone holds
    other.load_state_dict({**state, "grad_norm": unknown})


def _sampler_state():
    """A store of 50 scored samples and the state of an SB sampler in the middle of epoch 1."""
    store = sb.ScoreStore(50)
    store.update(np.arange(50), np.random.default_rng(0).exponential(size=50), epoch=0)
    sampler = sb.SelectiveSampler(store, "sb", fraction=0.3, seed=2)
    sampler.set_epoch(1)
    list(sampler)
    return store, _roundtrip(sampler.state_dict())


def test_sampler_refuses_tampered_plans_and_epochs_unchanged():
    store, state = _sampler_state()
    other = sb.SelectiveSampler(store, "sb", fraction=0.3, seed=2)
    before = other.state_dict()
    mult = state["plan"][1].clone()
    mult[0] = -2.0
    for bad, match in [({**state, "plan": (state["plan"][0], mult)}, "'plan.multipliers' holds -2"),
                       ({**state, "epoch": None}, "'epoch' must be an int >= 0"),
                       ({**state, "epoch": 1.5}, "'epoch' must be an int >= 0"),
                       ({**state, "frozen_epoch": "1"}, "'frozen_epoch' must be an int >= 0 or None"),
                       ({**state, "plan": (state["plan"][0] + 50, state["plan"][1])}, "it must be below 50")]:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(bad)
        assert _same_state(other.state_dict(), before)


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
    store, state = _sampler_state()
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
