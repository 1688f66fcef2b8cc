"""Resume: stop mid-epoch, save, restore in a new process, continue exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import sbsampler as sb

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(*args: str) -> dict:
    out = args[1]
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=300)
    return json.loads(Path(out).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [7])
def test_resume_in_new_process_continues_exactly(tmp_path, stop_at):
    full = _run("full", str(tmp_path / "full.json"))
    ckpt = str(tmp_path / "ckpt.pt")
    first = _run("stop", str(tmp_path / "stop.json"), ckpt, str(stop_at))
    rest = _run("resume", str(tmp_path / "resume.json"), ckpt)
    for j in full:
        ref = full[j]["steps"]
        got = first[j]["steps"] + rest[j]["steps"]
        assert len(first[j]["steps"]) == stop_at
        # Stopping at step 7 of ~6 per epoch lands mid-epoch 1; a queue is in flight when rebatching.
        assert got == ref, f"config {j}: resumed run differs from the uninterrupted one"
        s = rest[j]["stats"]
        assert s["samples_seen"] == s["samples_selected"] + s["samples_not_selected"] + s["samples_skipped"]
        if j != "3":  # importance sampling draws with replacement: repeats are yielded twice
            assert s["samples_yielded"] + s["samples_dropped"] + s["samples_abandoned"] == s["samples_selected"]
        clocks = ("selection_time", "steps_timed", "estimate_basis", "break_even_fraction")  # this run's timings
        assert s == full[j]["stats"] | {k: s[k] for k in s if k.startswith(("time_", "estimated_")) or k in clocks}


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


class Flaky:
    """Batches of a tensor dataset; raises once, at batch ``fail_at`` of its first pass."""

    def __init__(self, x, y, batch_size, fail_at):
        self.x, self.y, self.bs, self.fail_at, self.failed = x, y, batch_size, fail_at, False

    def __len__(self):
        return -(-len(self.x) // self.bs)

    def __iter__(self):
        for j in range(len(self)):
            if j == self.fail_at and not self.failed:
                self.failed = True
                raise OSError("disk went away")
            s = slice(j * self.bs, (j + 1) * self.bs)
            yield self.x[s], self.y[s], torch.arange(len(self.x))[s]


def _selective(loader, rebatch=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return sb.SelectiveLoader(loader, sb.ScoringHook(model), "sb", fraction=0.3, rebatch=rebatch, batch_size=16, seed=1)


def test_exception_in_wrapped_loader_propagates_and_state_survives():
    x, y = _data()
    ref = [(b.indices.tolist(), b.weights.tolist()) for b in _selective(Flaky(x, y, 20, fail_at=10**9))]
    sel = _selective(Flaky(x, y, 20, fail_at=5))
    got = []
    with pytest.raises(OSError, match="disk went away"):
        for b in sel:
            got.append((b.indices.tolist(), b.weights.tolist()))
    state = sel.state_dict()
    assert state["in_epoch"] and state["position"] == 5 and state["queue"], "a queue was in flight"
    sel.load_state_dict(state)
    got += [(b.indices.tolist(), b.weights.tolist()) for b in sel]
    assert got == ref
    s = sel.stats
    assert s.samples_seen == len(x) == s.samples_selected + s.samples_not_selected
    assert s.samples_yielded == s.samples_selected


def test_broken_off_epoch_counts_its_queue_as_abandoned():
    x, y = _data()
    sel = _selective(Flaky(x, y, 20, fail_at=10**9))
    for j, _ in enumerate(sel):
        if j == 1:
            break
    queued = sum(len(e["indices"]) for e in sel.state_dict()["queue"])
    assert queued > 0
    list(sel)  # a fresh epoch: the abandoned queue is reported, not silently lost
    s = sel.stats
    assert s.samples_abandoned == queued
    assert s.samples_yielded + s.samples_dropped + s.samples_abandoned == s.samples_selected


def test_resume_refuses_a_loader_that_does_not_replay_the_same_order():
    x, y = _data()
    sel = _selective(Flaky(x, y, 20, fail_at=10**9))
    it = iter(sel)
    next(it)
    state = sel.state_dict()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    other = _selective(Flaky(x[perm], y[perm], 20, fail_at=10**9))
    other.loader.__class__ = type("Shuffled", (Flaky,), {
        "__iter__": lambda self: ((a, b, perm[i.numpy()]) for a, b, i in Flaky.__iter__(self))})
    other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="same order"):
        list(other)


def _selections(num_workers, persistent, seed=0):
    x, y = _data(300)
    ds = sb.with_indices(TensorDataset(x, y))
    # The order is a function of (seed, epoch), as with DistributedSampler.set_epoch: a shuffling
    # DataLoader with workers draws its workers' base seed from its generator, which changes the
    # next epoch's order, a DataLoader behaviour unrelated to selection.
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator warns and does nothing
        loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=num_workers,
                            persistent_workers=persistent, pin_memory=True)
        sel = _selective(loader)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [(b.indices.tolist(), b.weights.tolist()) for b in sel]
    return out


def test_workers_do_not_change_selections():
    base = _selections(0, False)
    assert _selections(2, True) == base
    assert _selections(2, False) == base
    assert _selections(2, True, seed=1) != base
    assert len({i for step in base for i in step[0]}) > 100
    assert np.isfinite([w for step in base for w in step[1]]).all()


def test_resume_keeps_a_variable_count_strategys_samples_per_pick():
    """Rebatched InfoBatch weights an epoch's rows by one samples per pick, taken from the epoch before (in the first
    epoch, from its first draw): a fresh loader restored mid-epoch 1 must continue with the same weights."""
    x, y = _data()

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        return sb.SelectiveLoader(Flaky(x, y, 20, fail_at=10**9), sb.ScoringHook(model), sb.InfoBatch(0.5, seed=3),
                                  rebatch=True, batch_size=16)

    ref_loader = make()
    ref = [(b.indices.tolist(), b.weights.tolist()) for _ in range(2) for b in ref_loader]
    first = make()
    got = [(b.indices.tolist(), b.weights.tolist()) for b in first]  # epoch 0
    it = iter(first)
    got += [(b.indices.tolist(), b.weights.tolist()) for b in (next(it), next(it))]  # 2 steps into epoch 1
    state = first.state_dict()
    assert state["carried"] is not None and state["drawn"][1] > 0
    second = make()
    second.load_state_dict(state)
    got += [(b.indices.tolist(), b.weights.tolist()) for b in second]
    assert got == ref
