"""Mistakes that used to surface as another library's cryptic error now name the mistake (issue 22).

Inputs on the meta device, a namedtuple batch whose fields are not in (inputs, targets) order, and a copy
(pickle, deepcopy) of a loader after an epoch or in the middle of one.
"""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _xy(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_inputs_or_a_model_on_the_meta_device_are_named():
    x, y = _xy(8)
    with pytest.raises(ValueError, match="inputs are on the meta device"):
        list(sb.SelectiveLoader([(x.to("meta"), y.to("meta"))], sb.ScoringHook(_model()), "sb"))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"model's parameters are on the meta device.*to_empty"):
        list(sb.SelectiveLoader([(x, y)], sb.ScoringHook(meta), "sb"))


@pytest.mark.parametrize("strategy", ["importance", "sb"])
def test_a_model_partly_on_the_meta_device_is_named_on_every_path(strategy):
    """A model whose head is still on the meta device gave "Tensor on device meta is not on the expected device" or
    "Cannot copy out of meta tensor" through BatchSelector (issue 31, item 9): every path names the meta tensors."""
    x, y = _xy(16)
    model = _model()
    model[2].to("meta")
    with pytest.raises(ValueError, match=r"model's parameters are on the meta device \(2 of its parameters and "
                                         r"buffers: 2.weight, 2.bias\).*to_empty"):
        sb.BatchSelector(sb.ScoringHook(model), strategy, seed=0)((x, y))
    with pytest.raises(ValueError, match=r"model's parameters are on the meta device"):
        list(sb.SelectiveLoader([(x, y)], sb.ScoringHook(model), strategy))


def test_a_namedtuple_batch_is_read_by_its_names_or_refused_when_its_order_looks_reversed():
    x, y = _xy(8)
    reversed_ = collections.namedtuple("Batch", "label image")
    with pytest.raises(TypeError, match=r"namedtuple Batch\(label, image\).*first field 'label' looks like the "
                                        r"targets.*BatchKeys\(inputs='image', targets='label'\)"):
        list(sb.SelectiveLoader([reversed_(y, x)], sb.ScoringHook(_model()), "sb"))
    # named as BatchKeys says: read by name, in any order
    keys = sb.BatchKeys(inputs="image", targets="label")
    steps = list(sb.SelectiveLoader([reversed_(y, x)], sb.ScoringHook(_model()), "topk", batch_keys=keys))
    assert len(steps) == 1 and steps[0].inputs.dtype == torch.float32 and steps[0].targets.dtype == torch.int64
    named = collections.namedtuple("Named", "targets inputs indices")
    (step,) = list(sb.SelectiveLoader([named(y, x, torch.arange(10, 18))], sb.ScoringHook(_model()), "topk"))
    assert step.inputs.shape[1] == 6 and set(step.indices.tolist()) <= set(range(10, 18))
    plain = collections.namedtuple("Plain", "x y")  # (inputs, targets) by position, as before
    assert len(list(sb.SelectiveLoader([plain(x, y)], sb.ScoringHook(_model()), "topk"))) == 1


def test_a_scoring_forward_that_fails_says_how_the_batch_was_read():
    x, y = _xy(8)
    with pytest.raises(RuntimeError) as err:
        list(sb.SelectiveLoader([(y, x)], sb.ScoringHook(_model()), "sb"))  # a plain tuple in the wrong order
    assert "scoring the batch's inputs (a Tensor int64 of shape (8,))" in "\n".join(getattr(err.value, "__notes__", []))


def _loader(strategy="infobatch", rebatch=True):
    x, y = _xy(80)
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=16)
    fraction = None if strategy == "infobatch" else 0.25  # InfoBatch chooses its own count
    return sb.SelectiveLoader(dl, sb.ScoringHook(_model()), strategy, fraction=fraction, rebatch=rebatch, seed=3,
                              batch_size=8)


def _record(loader, epochs=1):
    return [(b.indices.tolist(), [round(w, 7) for w in b.weights.tolist()]) for _ in range(epochs) for b in loader]


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("strategy", ["infobatch", "sb", "uniform"])
def test_a_copy_after_an_epoch_continues_as_the_original(how, strategy):
    """'cannot pickle generator' before; and the copy's next epoch must read the samples per pick of the one
    before it, as the original's does."""
    original = _loader(strategy)
    _record(original)
    twin = COPIES[how](original)
    assert twin.next_epoch == original.next_epoch == 1
    assert _record(twin, 2) == _record(original, 2)


def _same(a, b, path="state", clocks=True):
    """Two states are equal, field by field (tensors by value, NaN equal to NaN); an AssertionError names the field.
    ``clocks=False``: the stage timers (``time_*``, ``steps_timed``), which measure this run's wall time, are not
    compared."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if clocks or not (str(k).startswith("time_") or k == "steps_timed"):
                _same(a[k], b[k], f"{path}.{k}", clocks)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for j, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{path}[{j}]", clocks)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.dtype.is_floating_point and torch.allclose(a, b, equal_nan=True)), path
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("strategy", ["importance", "infobatch", "sb"])
def test_a_copy_mid_epoch_saves_the_state_the_original_saves(how, strategy):
    """A copy made mid-epoch saved another state than its original (its next_epoch was the epoch it resumes, the
    original's the one after it; issue 31, item 10): a copy goes on as the original would, state included."""
    original = _loader(strategy)
    it = iter(original)
    next(it), next(it)
    twin = COPIES[how](original)
    _same(twin.state_dict(), original.state_dict())
    rest = [(b.indices.tolist(), [round(w, 7) for w in b.weights.tolist()]) for b in it]
    assert _record(twin) == rest
    _same(twin.state_dict(), original.state_dict(), clocks=False)


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_mid_epoch_continues_that_epoch_from_where_it_stands(how):
    original = _loader()
    _record(original)
    it = iter(original)
    seen = [next(it), next(it)]
    assert original.current_iterator.queued() > 0  # rows of a half-used batch wait in the queue
    twin = COPIES[how](original)
    rest = [(b.indices.tolist(), [round(w, 7) for w in b.weights.tolist()]) for b in it]
    assert _record(twin) == rest  # the copy finishes the epoch the original was in ...
    assert _record(twin) == _record(original) and len(seen) == 2  # ... and goes on as it does
