"""The bad-input matrix: one row per case, each naming the expected error or behaviour.

Every row that runs to completion also checks the accounting: each sample that
enters is back-propagated or reported in ``loader.stats``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn

import sbsampler as sb

DIM, C = 6, 4
STRATEGIES = ["uniform", "topk", "sb", "gradmatch", "importance"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, C))


def _batches(n_batches=3, b=8, seed=0, **extra) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n_batches):
        x, y = torch.randn(b, DIM, generator=g), torch.randint(0, C, (b,), generator=g)
        out.append((x, y, torch.arange(j * b, (j + 1) * b)))
    return out


def _run(batches, strategy="uniform", model=None, hook=None, **kw) -> sb.SelectiveLoader:
    hook = hook or sb.ScoringHook(model or _model())
    loader = sb.SelectiveLoader(batches, hook, strategy, seed=0, **{"fraction": 0.5, **kw})
    loader.out = list(loader)  # type: ignore[attr-defined]
    return loader


def _accounted(loader: sb.SelectiveLoader) -> None:
    s = loader.stats
    assert s.samples_seen == s.samples_selected + s.samples_not_selected + s.samples_skipped
    assert s.samples_yielded + s.samples_dropped + s.samples_abandoned == s.samples_selected
    assert sum(len(b) for b in loader.out) == s.samples_yielded  # type: ignore[attr-defined]


class NotLinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(DIM, 8)
        self.head = nn.Bilinear(8, 8, C)

    def forward(self, x):
        h = self.body(x)
        return self.head(h, h)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, C, DIM)

    def forward(self, x):
        return self.conv(x[:, None]).flatten(1)


class SkipsHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, C)
        self.aux = nn.Linear(C, C)  # found as "the last Linear" but never called

    def forward(self, x):
        return self.fc(x)


class Exploding:
    def __iter__(self):
        yield _batches(1)[0]
        raise ConnectionError("remote store unreachable")


def _nan_batches():
    batches = _batches()
    x, y, i = batches[1]
    x = x.clone()
    x[2] = float("nan")
    x[5] = float("inf")
    batches[1] = (x, y, i)
    return batches


def _ties():
    """Every strategy on a batch whose samples are identical: k distinct samples each."""
    tie = [(torch.zeros(8, DIM), torch.zeros(8, dtype=torch.long))]
    strategies = [sb.get_strategy(name, seed=0) for name in STRATEGIES[:-1]] + [sb.ImportanceSampling(replace=False)]
    for strategy in strategies:
        loader = _run(tie, strategy)
        _accounted(loader)
        _check_ties(loader)
    return loader


def _check_ties(loader):
    for b in loader.out:
        assert len(set(b.indices.tolist())) == len(b) == 4


def _check_skip(loader):
    assert loader.stats.samples_skipped == 2
    assert not {10, 13} & {i for b in loader.out for i in b.indices.tolist()}


def _check_extras_dict(loader):
    for b in loader.out:
        assert torch.equal(b.extras["meta"], b.indices * 10)
        assert b.extras["names"] == [f"s{i}" for i in b.indices.tolist()]
        assert b.extras["source"] == "cam0"  # batch-level: passed through unchanged


def _check_extras_tuple(loader):
    for b in loader.out:
        assert torch.equal(b.extras[3], b.indices.float() / 2)


def _dict_batches():
    return [{"inputs": x, "targets": y, "indices": i, "meta": i * 10, "names": [f"s{v}" for v in i.tolist()],
             "source": "cam0"} for x, y, i in _batches()]


def _tuple_batches():
    return [(x, y, i, i.float() / 2) for x, y, i in _batches()]


def _small_int_labels():
    """F.cross_entropy takes any integer labels; so does scoring."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        loader = _run([(x, y.to(dtype), i) for x, y, i in _batches()], "topk")
        _accounted(loader)
        assert all(b.targets.dtype == dtype for b in loader.out)
    return loader


def _unbatched():
    from torch.utils.data import DataLoader, TensorDataset

    x, y, _ = _batches(1)[0]
    return DataLoader(TensorDataset(x, y), batch_size=None)


class _SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, C)

    def forward(self, x):
        return self.fc(x.float().mean(1, keepdim=True))


def _ragged():
    """Token batches padded to each batch's own longest sequence: 12, then 17."""
    return [(torch.randint(0, 9, (8, t)), torch.randint(0, C, (8,)), torch.arange(8 * j, 8 * j + 8))
            for j, t in enumerate((12, 17))]


def _beton_without_index(tmp_path):
    if os.environ.get("SBSAMPLER_REQUIRE_FFCV") != "1":
        pytest.importorskip("ffcv")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    path = tmp_path / "noindex.beton"
    sb.ffcv.write_beton([(torch.zeros(3, 4, 4, dtype=torch.uint8), 1)] * 4, path)
    loader = Loader(str(path), batch_size=2, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
                               "label": [IntDecoder(), ToTensor()], "index": None})
    return _run(loader)


# (case id, action(tmp_path) -> loader, expected exception or None, message match, extra check)
CASES: list[tuple[str, Callable[[Any], Any], Optional[type], str, Optional[Callable]]] = [
    ("nan/inf input raises", lambda t: _run(_nan_batches(), "topk"), ValueError, r"non-finite.*\[10, 13\]", None),
    ("nan/inf input skipped", lambda t: _run(_nan_batches(), "topk", nan_policy="skip"), None, "", _check_skip),
    ("nan/inf input kept", lambda t: _run(_nan_batches(), "topk", nan_policy="keep"), None, "", None),
    ("all-equal losses (ties)", lambda t: _ties(), None, "", _check_ties),
    ("batch of size 1", lambda t: _run(_batches(b=1), "gradmatch", fraction=0.1), None, "", None),
    ("k > B", lambda t: sb.Uniform().select(sb.ScoringHook(_model()).score(*_batches()[0][:2]), 9),
     ValueError, r"k must be in \[1, 8\]", None),
    ("fraction 0", lambda t: _run(_batches(), fraction=0.0), ValueError, "fraction", None),
    ("fraction > 1", lambda t: _run(_batches(), fraction=1.5), ValueError, "fraction", None),
    ("label out of range", lambda t: _run([(torch.randn(4, DIM), torch.tensor([0, 1, 2, C]))], "topk"),
     ValueError, f"label {C} is out of range", None),
    ("negative label", lambda t: _run([(torch.randn(4, DIM), torch.tensor([0, -1, 2, 1]))], "topk"),
     ValueError, "label -1 is out of range", None),
    ("float labels", lambda t: _run([(torch.randn(4, DIM), torch.zeros(4))], "topk"), TypeError, "integer", None),
    ("inputs/targets lengths differ", lambda t: _run([(torch.randn(5, DIM), torch.zeros(4, dtype=torch.long))]),
     ValueError, "5 samples but targets have 4", None),
    ("indices of the wrong length", lambda t: _run([(torch.randn(4, DIM), torch.zeros(4, dtype=torch.long),
                                                   torch.arange(3))]), ValueError, "3 indices", None),
    ("dict batch with extras", lambda t: _run(_dict_batches()), None, "", _check_extras_dict),
    ("tuple batch with extras, rebatched", lambda t: _run(_tuple_batches(), "sb", rebatch=True, batch_size=6),
     None, "", _check_extras_tuple),
    ("batch-level extra cannot be rebatched", lambda t: _run(_dict_batches(), rebatch=True, batch_size=6),
     TypeError, "'source' is not per-sample", None),
    ("head is not nn.Linear", lambda t: sb.ScoringHook(NotLinearHead(), head=NotLinearHead().head),
     TypeError, "head must be an nn.Linear", None),
    ("gradmatch on a model without nn.Linear", lambda t: _run(_batches(), "gradmatch", model=_NoLinear()),
     ValueError, "losses only.*head=", None),
    ("head not reached in forward", lambda t: _run(_batches(), "topk", model=SkipsHead()), RuntimeError,
     "was not called in the model's forward", None),
    ("loader that yields nothing", lambda t: _run([]), None, "", lambda ld: ld.stats.samples_seen == 0 == len(ld.out)),
    ("empty batches", lambda t: _run([(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long))] + _batches(1)),
     None, "", lambda ld: ld.stats.steps == 1),
    ("exception inside the wrapped loader", lambda t: _run(Exploding()), ConnectionError, "unreachable", None),
    (".beton without an index field", _beton_without_index, ValueError, "index", None),
    ("uint8 / int16 / int32 labels", lambda t: _small_int_labels(), None, "", None),
    ("numpy inputs, tensor targets", lambda t: _run([(x.numpy(), y, i) for x, y, i in _batches()]), None, "",
     lambda ld: all(isinstance(b.inputs, torch.Tensor) for b in ld.out)),
    ("DataLoader(batch_size=None): unbatched samples", lambda t: _run(_unbatched()), TypeError, "unbatched", None),
    ("rebatching sequences padded per batch",
     lambda t: _run(_ragged(), model=_SeqModel(), rebatch=True, batch_size=6), ValueError,
     r"different shapes beyond the batch dimension: \[\(12,\), \(17,\)\]", None),
    ("fraction as a NumPy float", lambda t: _run(_batches(), fraction=np.float32(0.5)), None, "",
     lambda ld: [len(b) for b in ld.out] == [4, 4, 4]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, tmp_path):
    _, action, err, match, check = case
    if err is not None:
        with pytest.raises(err, match=match):
            action(tmp_path)
        return
    loader = action(tmp_path)
    _accounted(loader)
    if check is not None:
        assert check(loader) is not False


def test_exception_leaves_counters_consistent():
    loader = sb.SelectiveLoader(Exploding(), sb.ScoringHook(_model()), "uniform", fraction=0.5, seed=0)
    got = []
    with pytest.raises(ConnectionError):
        for b in loader:
            got.append(b)
    s = loader.stats
    assert s.samples_seen == 8 and s.samples_yielded == sum(map(len, got)) == 4
    assert s.samples_seen == s.samples_selected + s.samples_not_selected


def test_batch_level_fields_are_declared_not_guessed_by_length():
    """A class-weight vector of length C: per-sample-ness must not flip on the batch whose size happens to be C."""
    class_weights = torch.tensor([1.0, 2.0, 3.0, 4.0])  # C = 4 classes
    batches = [{"inputs": x, "targets": y, "indices": i, "class_weights": class_weights}
               for x, y, i in _batches(2, b=8) + _batches(1, b=4, seed=3)]  # the last batch has 4 = C samples
    expected = r"'class_weights' has 4 rows for a batch of 8.*batch_fields=\('class_weights',\)"
    with pytest.raises(ValueError, match=expected):
        _run(batches)
    loader = _run(batches, batch_fields=("class_weights",))
    assert all(b.extras["class_weights"] is class_weights for b in loader.out)  # never gathered, also on the 4-batch
    _accounted(loader)
    rebatched = _run(batches, "topk", batch_fields=("class_weights",), rebatch=True, batch_size=2)
    assert all(b.extras["class_weights"] is class_weights for b in rebatched.out)  # steps of 2 rows of one batch
