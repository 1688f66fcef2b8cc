"""``select_on="device"``: a batch selected with torch ops where its losses live, reading nothing back to the host.

These run on CPU tensors. A GPU's own check (``torch.cuda.set_sync_debug_mode("error")``
around a loader's loop) is in ``test_cuda.py``; here ``HostReads`` stands in for it:
it records every Python read of a tensor's value (``item``, ``bool``, ``int``,
``tolist``, ``numpy``...) and every op whose output shape depends on the values
(``nonzero``, ``unique``, boolean-mask indexing) -- what would wait for a GPU.
Device-to-host copies (``.cpu()``) cannot be told apart from no-ops on the CPU and
are left to the GPU test.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import sbsampler as sb
from sbsampler.strategies import fraction_for
from sbsampler.distributed import LocalSync
from sbsampler.select import observe_round
from sbsampler.deferred import DeferredChecks

DIM, C = 6, 4
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "numpy", "__array__",
         "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "repeat_interleave"}


class HostReads(TorchFunctionMode):
    """Records the tensor ops that would make a GPU's host wait (``self.reads``), outside a CPU-only check."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args[1])):
            if not _in_immediate_check():
                self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _in_immediate_check() -> bool:
    """Inside ``DeferredChecks`` reading a CPU flag at once: on a GPU that read is deferred (test_cuda)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is DeferredChecks.add.__code__:
            return True
        frame = frame.f_back
    return False


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, C))


def _batches(n=6, b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, DIM, generator=g), torch.randint(0, C, (b,), generator=g),
             torch.arange(j * b, (j + 1) * b)) for j in range(n)]


FIXED = [("uniform", {}), ("topk", {}), ("sb", {}), ("sb", {"unbiased": True}), ("composer", {}), ("full", {})]


@pytest.mark.parametrize("name,kwargs", FIXED, ids=[f"{n}{'-unbiased' if k else ''}" for n, k in FIXED])
@pytest.mark.parametrize("nan_policy", ["raise", "keep"])
def test_fixed_count_rules_read_nothing_back(name, kwargs, nan_policy):
    hook = sb.ScoringHook(_model())
    strategy = sb.STRATEGIES[name](**kwargs, seed=0)
    batches = [sb.parse_batch(b) for b in _batches()]
    sb.select_batch(hook, strategy, batches[0], fraction_for(strategy, 0.25), select_on="device")  # head checked once
    with HostReads() as mode:
        for batch in batches[1:]:
            picked = sb.select_batch(hook, strategy, batch, fraction_for(strategy, 0.25), nan_policy=nan_policy,
                                     select_on="device")
            observe_round(strategy, picked, LocalSync())
    assert mode.reads == []
    k = 32 if strategy.keeps_all else 8
    assert len(picked.sub) == k and picked.distinct == k
    assert picked.sub.indices.tolist() == (batches[-1].indices[picked.rows]).tolist()
    if not kwargs.get("unbiased"):
        torch.testing.assert_close(picked.sub.weights, torch.full((k,), 1 / k))


@pytest.mark.parametrize("rebatch", [False, True])
@pytest.mark.parametrize("name", ["uniform", "topk", "sb", "composer", "full"])
def test_the_loaders_loop_reads_nothing_back(name, rebatch):
    """Beyond select_batch: the epoch's queue, rebatching, weights and stats read no value back either."""
    loader = sb.SelectiveLoader(_batches(n=8), sb.ScoringHook(_model()), name,
                                fraction=fraction_for(name, 0.25), rebatch=rebatch,
                                seed=0, select_on="device", batch_size=32)
    steps = iter(loader)
    next(steps)  # the hook checks its head once
    with HostReads() as mode:
        rest = [next(steps) for _ in range(1 if rebatch else 5)]
    assert mode.reads == []
    assert all(len(step) == (32 if rebatch or name == "full" else 8) for step in rest)


@pytest.mark.parametrize("name", ["uniform", "topk", "sb", "composer"])
def test_the_framework_selector_reads_nothing_back(name):
    """``BatchSelector`` (Lightning, HF Trainer): one batch in, its weighted sub-batch out, no value read back."""
    selector = sb.BatchSelector(sb.ScoringHook(_model()), name,
                                fraction=fraction_for(name, 0.25), seed=0, select_on="device")
    batches = [sb.parse_batch(b) for b in _batches()]
    selector(batches[0])
    with HostReads() as mode:
        out = [selector(batch) for batch in batches[1:]]
    assert mode.reads == [] and all(len(sub) == 8 for sub in out)


@pytest.mark.parametrize("strategy", [sb.InfoBatch(seed=0), sb.SelectiveBackprop(mode="bernoulli", seed=0)],
                         ids=["infobatch", "sb-bernoulli"])
def test_variable_count_rules_read_their_count_only(strategy):
    hook = sb.ScoringHook(_model())
    batches = [sb.parse_batch(b) for b in _batches()]
    sb.select_batch(hook, strategy, batches[0], fraction_for(strategy, 0.25), select_on="device")
    with HostReads() as mode:
        for batch in batches[1:]:
            picked = sb.select_batch(hook, strategy, batch, fraction_for(strategy, 0.25), select_on="device")
            observe_round(strategy, picked, LocalSync())
    assert mode.reads == ["nonzero"] * (len(batches) - 1)
    assert 0 < len(picked.sub) < 32


def test_host_path_reads_what_the_device_path_saves():
    """The detector is not blind: the NumPy/Numba path reads the losses back every batch."""
    hook, strategy = sb.ScoringHook(_model()), sb.ComposerRule(seed=0)
    batches = [sb.parse_batch(b) for b in _batches(n=2)]
    sb.select_batch(hook, strategy, batches[0], 0.25, select_on="host")
    with HostReads() as mode:
        sb.select_batch(hook, strategy, batches[1], 0.25, select_on="host")
    assert "numpy" in mode.reads and "__bool__" in mode.reads


def test_gradient_rules_stay_on_the_host_path():
    hook = sb.ScoringHook(_model())
    batch = sb.parse_batch(_batches(n=1)[0])
    picked = sb.select_batch(hook, sb.GradientMatching(seed=0), batch, 0.25, select_on="device")
    assert picked.residual is not None and len(picked.sub) == 8  # chose by OMP on the host, as before


def test_select_on_is_checked_everywhere():
    hook = sb.ScoringHook(_model())
    with pytest.raises(ValueError, match="select_on must be one of"):
        sb.select_batch(hook, "topk", _batches(n=1)[0], 0.25, select_on="gpu")
    with pytest.raises(ValueError, match="select_on must be one of"):
        sb.SelectiveLoader(_batches(), hook, "topk", select_on="gpu")
    with pytest.raises(ValueError, match="select_on must be one of"):
        sb.BatchSelector(hook, "topk", select_on="gpu")


@pytest.mark.parametrize("rebatch", [False, True])
@pytest.mark.parametrize("name", ["sb", "infobatch", "uniform"])
def test_loader_on_device_follows_the_weights_rule_and_resumes(name, rebatch):
    def loader():
        return sb.SelectiveLoader(_batches(n=8), sb.ScoringHook(_model()), name,
                                  fraction=fraction_for(name, 0.25), rebatch=rebatch,
                                  seed=3, select_on="device")

    first = loader()
    steps, state = [], None
    for j, step in enumerate(first):
        steps.append((step.indices.tolist(), step.weights.tolist()))
        if j == 0:
            state = first.state_dict()
    assert state["strategy"]["device_rng"], "the device generator's state is saved"
    for indices, weights in steps:
        assert len(indices) == len(set(indices)) and abs(sum(weights) - 1) < 0.35  # sums to 1 in expectation
    stats = first.stats
    assert stats.samples_seen == 256 and stats.samples_selected + stats.samples_not_selected == 256
    resumed = loader()
    resumed.load_state_dict(state)
    assert [(s.indices.tolist(), s.weights.tolist()) for s in resumed] == steps[1:]


def test_loader_on_device_raises_the_batchs_non_finite_losses():
    batches = _batches(n=3)
    batches[1][0][5] = float("nan")
    loader = sb.SelectiveLoader(batches, sb.ScoringHook(_model()), "sb", seed=0, select_on="device")
    with pytest.raises(ValueError, match=r"dataset indices \[37\]"):
        list(loader)
    with pytest.raises(ValueError, match="target label 7 is out of range"):
        bad = [(torch.randn(8, DIM), torch.full((8,), 7), torch.arange(8))]
        list(sb.SelectiveLoader(bad, sb.ScoringHook(_model()), "topk", select_on="device"))


@pytest.mark.parametrize("SEED", [11, 12])
def test_same_law_through_the_loader_on_both_paths(SEED):
    """Per-sample selection frequencies of a loss-history rule agree between the paths over many epochs."""
    counts = {}
    for select_on in ("host", "device"):
        loader = sb.SelectiveLoader(_batches(n=2, b=16), sb.ScoringHook(_model()),
                                    sb.SelectiveBackprop(beta=2.0, seed=SEED), fraction=0.25, select_on=select_on)
        c = np.zeros(32)
        for _ in range(2400):
            for step in loader:
                c[step.indices.numpy()] += 1
        counts[select_on] = c / 2400
    # standard error of a difference of two frequencies <= 0.0145: 0.06 is 4 of them (seeds 0-3 gave 0.027-0.039)
    np.testing.assert_allclose(counts["device"], counts["host"], atol=0.06)
    assert np.corrcoef(counts["device"], counts["host"])[0, 1] > 0.99


def test_deferred_checks_read_cpu_flags_at_once():
    checks = DeferredChecks()
    checks.add(torch.tensor(False), lambda: ValueError("never"))
    with pytest.raises(ValueError, match="now"):
        checks.add(torch.tensor(True), lambda: ValueError("now"))
    assert len(checks) == 0
    checks.poll()
    checks.flush()


def test_clock_and_stats_add_up_on_the_host():
    hook = sb.ScoringHook(_model())
    loader = sb.SelectiveLoader(_batches(), hook, "composer", select_on="device")
    list(loader)
    stats = loader.stats
    assert stats.time_scoring > 0 and stats.time_selecting > 0 and stats.time_gathering > 0
    assert stats.selection_time == pytest.approx(stats.time_scoring + stats.time_selecting + stats.time_gathering)
    picked = sb.select_batch(hook, "topk", _batches(n=1)[0], 0.25)
    assert set(picked.seconds) == {"scoring", "selecting", "gathering"}


class _GpuClockStub:
    """A stage clock whose GPU work has (``finished``) or has not yet run: ``seconds`` would wait."""

    cuda = True

    def __init__(self, finished: bool, seconds: float) -> None:
        self.finished, self._s, self.waited = finished, seconds, False

    def done(self) -> bool:
        return self.finished

    @property
    def seconds(self) -> dict:
        self.waited = not self.finished
        return {"scoring": self._s, "selecting": 0.0, "gathering": 0.0}


def test_stats_for_per_step_logging_do_not_wait_for_the_gpu():
    """``as_dict(wait=False)`` (the Lightning callback's, every step) adds the finished GPU clocks only, in order;
    a plain read waits for the rest."""
    stats = sb.LoaderStats()
    first, second, third = _GpuClockStub(True, 1.0), _GpuClockStub(False, 2.0), _GpuClockStub(True, 4.0)
    stats._clocks = [first, second, third]
    d = stats.as_dict(wait=False)
    assert d["time_scoring"] == 1.0 and d["selection_time"] == 1.0
    assert not second.waited and stats._clocks == [second, third]  # still pending, in order
    assert stats.time_scoring == 7.0 and second.waited and stats._clocks == []
