"""ScoreStore (issue 33 items 2 and 3): compact columns (12 bytes a sample, float64 on request, the reference
column only once set), older states loading, and a store beyond memory: memory-mapped files, saved atomically,
reopened after a restart."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sbsampler as sb


def _filled(store, seed=0):
    rng = np.random.default_rng(seed)
    n = len(store)
    idx = rng.permutation(n)[: n // 2]
    store.update(idx, rng.exponential(size=idx.size), rng.random(idx.size), epoch=3)
    return idx


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_a_store_takes_twelve_bytes_a_sample_and_float64_on_request():
    store = sb.ScoreStore(1000)
    assert store.nbytes == 12 * 1000 and store.reference is None
    assert (store.loss.dtype, store.grad_norm.dtype, store.scored_epoch.dtype) == (np.float32, np.float32, np.int32)
    store.set_reference(np.ones(1000))
    assert store.nbytes == 16 * 1000  # the reference column exists once set
    wide = sb.ScoreStore(1000, dtype="float64")
    assert wide.nbytes == 20 * 1000 and wide.loss.dtype == np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        sb.ScoreStore(10, dtype="float16")
    with pytest.raises(ValueError, match="use ScoreStore\\(..., dtype='float64'\\)"):
        store.update([0], [1e39])


def test_states_load_safely_across_dtypes_and_older_layouts():
    store = sb.ScoreStore(100)
    _filled(store)
    state = _roundtrip(store.state_dict())
    other = sb.ScoreStore(100)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.loss, store.loss)
    np.testing.assert_array_equal(other.scored_epoch, store.scored_epoch)
    wide = sb.ScoreStore(100, dtype="float64")
    wide.load_state_dict(state)  # float32 columns into a float64 store
    np.testing.assert_array_equal(wide.loss, store.loss.astype(np.float64))
    old = {"version": 2, "num_samples": 100, "loss": torch.from_numpy(store.loss.astype(np.float64)),
           "grad_norm": torch.from_numpy(store.grad_norm.astype(np.float64)),
           "reference": torch.full((100,), float("nan"), dtype=torch.float64),
           "scored_epoch": torch.from_numpy(store.scored_epoch.astype(np.int64)), "current_epoch": 3}
    again = sb.ScoreStore(100)
    again.load_state_dict(_roundtrip(old))  # a version-2 state: float64 and int64, an all-NaN reference
    np.testing.assert_array_equal(again.loss, store.loss)
    assert again.reference is None and again.current_epoch == 3


def test_a_memory_mapped_store_is_saved_atomically_and_reopened(tmp_path):
    path = tmp_path / "scores"
    store = sb.ScoreStore.open(path, 5000)
    assert isinstance(store.loss, np.memmap) and store.path == path
    idx = _filled(store)
    store.set_reference(np.linspace(0.0, 1.0, 5000))
    store.current_epoch = 4
    store.flush()
    again = sb.ScoreStore.open(path)  # after a restart
    np.testing.assert_array_equal(again.loss, store.loss)
    np.testing.assert_array_equal(again.reference, store.reference)
    assert again.current_epoch == 4 and int(again.scored().sum()) == idx.size
    with pytest.raises(ValueError, match="holds 5000 samples, not 10"):
        sb.ScoreStore.open(path, 10)
    with pytest.raises(ValueError, match="holds no ScoreStore: pass num_samples="):
        sb.ScoreStore.open(tmp_path / "empty")
    snapshot = tmp_path / "snapshot"
    again.save(snapshot)  # an atomic copy: a new folder renamed into place
    again.update([idx[0]], [123.0])
    again.save(snapshot)
    loaded = sb.ScoreStore.load(snapshot)
    assert loaded.loss[idx[0]] == 123.0 and loaded.path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores", "snapshot"]  # no staging folder left


def test_a_crash_while_saving_leaves_the_old_store(tmp_path):
    """The columns are written into a staging folder that is renamed into place only when complete: a process killed
    while writing leaves the previous save readable."""
    path = tmp_path / "scores"
    store = sb.ScoreStore(1000)
    _filled(store)
    store.save(path)
    script = ("import os, numpy as np, sbsampler as sb\n"
              "real = np.save\n"
              "def dying(file, arr, *a, **k):\n"
              "    real(file, arr, *a, **k)\n"
              "    os._exit(1)\n"
              "np.save = dying\n"
              f"s = sb.ScoreStore(1000)\ns.update([0], [5.0])\ns.save({str(path)!r})\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 1
    np.testing.assert_array_equal(sb.ScoreStore.load(path).loss, store.loss)


def test_a_sampler_plans_from_a_memory_mapped_store(tmp_path):
    store = sb.ScoreStore.open(tmp_path / "s", 2000)
    _filled(store)
    memory = sb.ScoreStore(2000)
    memory.load_state_dict(store.state_dict())
    plans = []
    for s in (store, memory):
        sampler = sb.SelectiveSampler(s, "sb", fraction=0.3, seed=1)
        sampler.set_epoch(4)
        plans.append(sampler.plan())
    np.testing.assert_array_equal(plans[0][0], plans[1][0])
    np.testing.assert_array_equal(plans[0][1], plans[1][1])
