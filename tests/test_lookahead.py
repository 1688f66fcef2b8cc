"""SelectiveLoader(lookahead=N): steps prepared in a thread, each batch scored by one version of the parameters.

The rule (``sbsampler.lookahead``): the batches of step ``p`` are scored by the parameters after ``max(0, p - N)``
optimizer steps of the epoch, whatever the threads' timing. The model here reads its two layers with a pause between
them, so that an optimizer step taken beside a forward of the live model would land in the middle of it; the
negative control shows that this setup does catch such a mix.
"""

from __future__ import annotations

import copy
import gc
import io
import threading
import time
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.distributed import RankSync

N_SAMPLES, BS = 160, 16


class _Events:
    """Set while a forward is between its two layers (``mid``), and what ends its pause (``go``); a copy of the model
    shares them."""

    def __init__(self) -> None:
        self.mid, self.go = threading.Event(), threading.Event()

    def __deepcopy__(self, memo):
        return self


class Slow(nn.Module):
    """Two layers read with a pause between them (a wide window for an optimizer step to land in)."""

    def __init__(self, pause: float = 0.002) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.pause = pause
        self.events = _Events()

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.pause:
            self.events.mid.set()
            self.events.go.wait(self.pause)
        return self.fc2(h)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_SAMPLES, 6, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g)


def _setup(strategy="sb", lookahead=1, rebatch=False, pause=0.002, store=True, batch_size=BS, **kw):
    torch.manual_seed(0)
    model = Slow(pause)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _data()
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=BS)
    scores = sb.ScoreStore(N_SAMPLES, dtype="float64") if store else None  # compared exactly with float64 losses
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), strategy,
                                fraction=sb.strategies.fraction_for(strategy, 0.25), rebatch=rebatch, seed=0,
                                lookahead=lookahead, store=scores, batch_size=batch_size or BS, **kw)
    return model, opt, loader, scores


def _train(model, opt, batch):
    loss = sb.weighted_loss(F.cross_entropy(model(batch.inputs), batch.targets, reduction="none"), batch.weights)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _losses(state, x, y):
    """Per-sample losses of ``x`` under the parameters ``state`` (a fresh model, no pause)."""
    model = Slow(pause=0.0)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none").double()


@pytest.mark.parametrize("lag", ["thread", "loop"])
@pytest.mark.parametrize("rebatch", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_every_batch_is_scored_by_the_parameters_n_steps_old(depth, rebatch, lag):
    """Whichever side is slower (the thread's forward pauses mid-model, or the loop's step sleeps), the batches of
    step p are scored by the parameters after max(0, p - N) steps: never fresher, never staler, never a mix."""
    model, opt, loader, store = _setup(lookahead=depth, rebatch=rebatch, pause=0.002 if lag == "thread" else 0.0,
                                       batch_size=8 if rebatch else None)
    x, y = _data()
    versions = [copy.deepcopy(model.state_dict())]  # versions[v]: the parameters after v steps
    for batch in loader:
        _train(model, opt, batch)
        versions.append(copy.deepcopy(model.state_dict()))
        if lag == "loop":
            time.sleep(0.004)
    per_step = 2 if rebatch else 1  # rebatching: 4 rows from each batch of 16, 8 rows a step
    assert len(versions) - 1 == 10 // per_step
    for b in range(N_SAMPLES // BS):
        p = b // per_step  # the step being made while batch b was read
        rows = slice(b * BS, (b + 1) * BS)
        want = _losses(versions[max(0, p - depth)], x[rows], y[rows])
        got = torch.from_numpy(store.loss[rows])
        assert torch.equal(got, want), f"batch {b} (step {p}) not scored by version {max(0, p - depth)}"


def test_the_live_model_scored_beside_a_step_mixes_versions():
    """The negative control: scoring the live model in a thread while the loop steps reads fc1 before the step and
    fc2 after it, and matches neither version; the replica never does (the test above)."""
    model, opt, _, _ = _setup(pause=5.0)
    x, y = _data()
    before = copy.deepcopy(model.state_dict())
    out = {}

    def score():
        with torch.no_grad():
            out["loss"] = F.cross_entropy(model(x[:BS]), y[:BS], reduction="none").double()

    thread = threading.Thread(target=score)
    thread.start()
    assert model.events.mid.wait(10)  # the thread's forward is between its layers: the loop takes its step now
    xb, yb = x[BS:2 * BS], y[BS:2 * BS]
    loss = F.cross_entropy(model.fc2(torch.relu(model.fc1(xb))), yb)  # (not through forward: it would pause)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.events.go.set()
    thread.join()
    after = copy.deepcopy(model.state_dict())
    assert not torch.equal(out["loss"], _losses(before, x[:BS], y[:BS]))
    assert not torch.equal(out["loss"], _losses(after, x[:BS], y[:BS]))


def _steps(loader, model, opt, epochs=2, stop=None):
    out = []
    for _ in range(epochs):
        for b in loader:
            _train(model, opt, b)
            out.append((b.indices.tolist(), [round(w, 7) for w in b.weights.tolist()]))
            if stop is not None and len(out) == stop:
                return out
    return out


@pytest.mark.parametrize("strategy,rebatch", [("sb", False), ("sb", True), ("infobatch", True),
                                              ("gradmatch", False), ("uniform", True)])
def test_a_run_is_the_same_whatever_the_timing(strategy, rebatch):
    runs = []
    for pause in (0.0, 0.003):  # no pause, then a thread that lags behind the loop
        model, opt, loader, _ = _setup(strategy, lookahead=2, rebatch=rebatch, pause=pause, store=False)
        runs.append((_steps(loader, model, opt), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy,rebatch", [("sb", False), ("infobatch", True), ("sb", True)])
def test_without_training_it_gives_the_steps_made_in_series(strategy, rebatch):
    """With the parameters unchanged every version is the same, so the steps are those of lookahead=0."""
    got = []
    for depth in (0, 3):
        _, _, loader, _ = _setup(strategy, lookahead=depth, rebatch=rebatch, pause=0.0, store=False)
        got.append([(b.indices.tolist(), b.weights.tolist()) for _ in range(2) for b in loader])
    assert got[0] == got[1]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("strategy,rebatch,stop", [("sb", False, 13), ("infobatch", True, 10), ("sb", True, 4),
                                                   ("gradmatch", False, 3)])
def test_resume_mid_epoch_is_exact(strategy, rebatch, stop):
    """The steps made ahead and not yet taken are saved as rows and yielded first after the resume."""
    model, opt, loader, _ = _setup(strategy, lookahead=2, rebatch=rebatch, pause=0.0, store=False)
    straight = _steps(loader, model, opt)
    final = [p.detach().clone() for p in model.parameters()]
    model, opt, loader, _ = _setup(strategy, lookahead=2, rebatch=rebatch, pause=0.0, store=False)
    done = _steps(loader, model, opt, stop=stop)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict()})
    assert ckpt["loader"]["in_epoch"] and ckpt["loader"]["pending"], "steps were made ahead when it was saved"
    model, opt, loader, _ = _setup(strategy, lookahead=2, rebatch=rebatch, pause=0.0, store=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    loader.load_state_dict(ckpt["loader"])
    rest = [(b.indices.tolist(), [round(w, 7) for w in b.weights.tolist()]) for b in _epoch(loader, model, opt)]
    rest += _steps(loader, model, opt, epochs=2 - loader.next_epoch)
    assert done + rest == straight
    for a, b in zip(final, model.parameters()):
        assert torch.equal(a, b)


def _epoch(loader, model, opt):
    for b in loader:
        _train(model, opt, b)
        yield b


def test_a_state_with_steps_made_ahead_resumes_without_look_ahead_too():
    model, opt, loader, _ = _setup("sb", lookahead=2, pause=0.0, store=False)
    _steps(loader, model, opt, stop=4)
    state = _roundtrip(loader.state_dict())
    _, _, plain, _ = _setup("sb", lookahead=0, pause=0.0, store=False)
    plain.load_state_dict(state)
    first = [b.indices.tolist() for b in plain][:2]
    pending = [[int(i) for p in step["parts"] for i in p["indices"]] for step in state["pending"]]
    assert first == pending  # the saved steps come first, as they were made


def test_an_error_reaches_the_loop_at_its_step_not_before():
    class Failing:
        def __init__(self, at):
            self.at = at

        def __iter__(self):
            x, y = _data()
            for j in range(10):
                if j == self.at:
                    raise OSError(f"disk error at batch {j}")
                yield x[j * BS:(j + 1) * BS], y[j * BS:(j + 1) * BS], torch.arange(j * BS, (j + 1) * BS)

    torch.manual_seed(0)
    model = Slow(0.0)
    loader = sb.SelectiveLoader(Failing(5), sb.ScoringHook(model), "sb", fraction=0.25, seed=0, lookahead=3)
    taken = []
    with pytest.raises(OSError, match="disk error at batch 5"):
        for b in loader:
            taken.append(b)
    assert len(taken) == 5  # every step before the failing batch, as in series


def test_breaking_off_an_epoch_stops_the_thread_and_keeps_the_accounts():
    model, opt, loader, _ = _setup("sb", lookahead=3, rebatch=True, pause=0.0, store=False)
    for j, b in enumerate(loader):
        _train(model, opt, b)
        if j == 0:
            break
    thread = loader.current_iterator._steps._thread
    list(loader)  # the next epoch, whole
    assert not thread.is_alive()
    stats = loader.stats
    assert stats.samples_yielded + stats.samples_dropped + stats.samples_abandoned == stats.samples_selected
    assert stats.samples_abandoned > 0


def test_progress_follows_the_steps_taken_not_the_thread():
    _, _, loader, _ = _setup("sb", lookahead=3, pause=0.0, store=False)
    seen = [loader.progress for _ in loader]
    np.testing.assert_allclose(seen, [(j + 1) / 10 for j in range(10)])


def test_a_copy_mid_epoch_goes_on_as_the_original():
    model, opt, loader, _ = _setup("sb", lookahead=2, pause=0.0, store=False)
    it = iter(loader)
    next(it)
    twin = copy.deepcopy(loader)
    assert [b.indices.tolist() for b in twin] == [b.indices.tolist() for b in it]


def test_uniform_needs_no_copy_of_the_model():
    _, _, loader, _ = _setup("uniform", lookahead=2, pause=0.0, store=False)
    list(loader)
    assert loader._replica is None


def test_what_it_refuses():
    torch.manual_seed(0)
    model = Slow(0.0)
    hook = sb.ScoringHook(model)
    with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
        sb.SelectiveLoader([], hook, lookahead=-1)
    with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
        sb.SelectiveLoader([], hook, lookahead=True)
    sync = RankSync.__new__(RankSync)
    sync.rank, sync.world_size = 0, 2
    with pytest.raises(ValueError, match="lookahead is not supported under DDP yet"):
        sb.SelectiveLoader([], hook, lookahead=1, distributed=sync)
    with pytest.raises(ValueError, match=r"forward=...\) callable runs the model it closes over"):
        sb.SelectiveLoader([], sb.ScoringHook(model, forward=lambda x: model(x)), lookahead=1)


def test_the_copy_of_the_model_carries_no_scoring_hook_and_is_refreshed():
    model, opt, loader, _ = _setup("sb", lookahead=1, pause=0.0, store=False)
    list(loader)
    replica = loader._replica
    assert replica.model is not model and replica.hook.model is replica.model
    assert len(replica.model.fc2._forward_hooks) == 1  # its own hook's, not a copy of the live one's
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    replica.refresh()
    assert torch.equal(replica.model.fc1.weight, model.fc1.weight)


# -- the copy stands for the model as it is now (issue 31, item 1) ----------------------------------------------------

class Changing(nn.Module):
    """A model whose structure, modes, dtype and attributes a training loop may change between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.T = 1.0  # a plain attribute the forward reads (a temperature)
        self.adapter = None

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x.to(self.fc1.weight.dtype))))
        if self.adapter is not None:
            h = h + self.adapter(h)
        return self.fc2(h) / self.T


def _change(case, model, opt):
    if case == "assign":  # new Parameter objects
        model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()}, assign=True)
    elif case == "head":
        model.fc2 = nn.Linear(8, 3)
    elif case == "adapter":
        model.adapter = nn.Linear(8, 8)
        opt.add_param_group({"params": model.adapter.parameters()})
    elif case == "eval":
        model.eval()
    elif case == "attribute":
        model.T = 3.0
    elif case == "double":
        model.double()


@pytest.mark.parametrize("case", ["assign", "head", "adapter", "eval", "attribute", "double"])
def test_the_copy_follows_the_model_beyond_its_values(case):
    """A change to the model between epochs (new Parameters, a replaced head, an added module, eval(), an attribute
    the forward reads, a dtype) reaches the look-ahead's copy: it scores exactly what lookahead=0 scores. Before,
    the copy kept the structure it was made with (largest difference 0.5 to 7.7, or a dtype error)."""
    x, y = _data()
    stores = []
    for depth in (0, 1):
        torch.manual_seed(0)
        model = Changing()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        store = sb.ScoreStore(N_SAMPLES)
        hook = sb.ScoringHook(model, train_mode=case == "eval", head=False if case == "head" else None)
        loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=BS), hook, "sb",
                                    fraction=0.25, seed=0, lookahead=depth, store=store)
        list(loader)
        _change(case, model, opt)
        torch.manual_seed(1)  # the same dropout masks for both runs
        list(loader)
        stores.append(store.loss.copy())
        if depth:
            assert loader._replica.copies == (1 if case == "eval" else 2)  # eval(): the flags copied, no new copy
    np.testing.assert_array_equal(stores[1], stores[0])


def test_a_copy_is_made_again_only_when_the_model_changed():
    model, opt, loader, _ = _setup("sb", lookahead=1, pause=0.0, store=False)
    _steps(loader, model, opt, epochs=2)
    assert loader._replica.copies == 1  # values only: refreshed, never copied again
    model.fc2.some_flag = [1, 2]  # a plain attribute: by value, so an in-place change is seen too
    list(loader)
    assert loader._replica.copies == 2
    model.fc2.some_flag.append(3)
    list(loader)
    assert loader._replica.copies == 3


def test_an_attribute_that_changes_at_every_step_is_named_once():
    class Recording(Slow):
        def forward(self, x):
            out = super().forward(x)
            self.last = out.detach()  # a new tensor object at each training step: the copy is made again each time
            return out

    torch.manual_seed(0)
    model = Recording(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=BS),
                                sb.ScoringHook(model), "sb", fraction=0.25, seed=0, lookahead=1)
    with pytest.warns(RuntimeWarning, match="made again at each of the last 5 steps, because 'last' changes"):
        _steps(loader, model, opt, epochs=1)


def test_a_replaced_head_given_to_the_hook_is_refused_as_in_series():
    for depth in (0, 1):
        torch.manual_seed(0)
        model = Changing()
        x, y = _data()
        loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=BS),
                                    sb.ScoringHook(model, head=model.fc2), "sb", seed=0, lookahead=depth)
        list(loader)
        model.fc2 = nn.Linear(8, 3)
        with pytest.raises(RuntimeError, match=r"the head this ScoringHook scores \(Linear\(8, 3\)\) is not part "
                                               r"of the model, so it is not called"):
            list(loader)


# -- the thread ends with its epoch (items 2 and 7) --------------------------------------------------------------------

def _lookahead_threads():
    return [t for t in threading.enumerate() if t.name == "sbsampler-lookahead"]


def test_the_thread_ends_when_the_loader_is_deleted():
    """Break out of an epoch, start no other, delete the loader and the model: the thread ends and nothing stays
    alive (before: the thread held the epoch, the loader, the model and its copy for the life of the process)."""
    before = set(_lookahead_threads())
    model, opt, loader, _ = _setup("sb", lookahead=2, pause=0.0, store=False)
    for b in loader:
        _train(model, opt, b)
        break
    threads = [t for t in _lookahead_threads() if t not in before]
    assert len(threads) == 1
    model_ref, loader_ref = weakref.ref(model), weakref.ref(loader)
    del model, opt, loader, b
    for _ in range(100):
        gc.collect()
        if not threads[0].is_alive():
            break
        time.sleep(0.05)
    assert not threads[0].is_alive()
    assert model_ref() is None and loader_ref() is None


def test_closing_the_epoch_ends_the_thread():
    model, opt, loader, _ = _setup("sb", lookahead=2, pause=0.0, store=False)
    it = iter(loader)
    _train(model, opt, next(it))
    thread = it._steps._thread
    it.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="superseded|closed"):
        next(it)


def test_two_threads_on_one_loader_never_hang():
    """Each of two threads iterating one look-ahead loader finishes, or is told its epoch was superseded (before:
    one of them waited forever in the step queue in about half the tries)."""
    for trial in range(10):
        _, _, loader, _ = _setup("sb", lookahead=2, pause=0.0, store=False)
        outcomes = []

        def run():
            try:
                for _ in loader:
                    time.sleep(0.001)
                outcomes.append("done")
            except RuntimeError as err:
                outcomes.append("superseded" if "superseded" in str(err) else repr(err))

        threads = [threading.Thread(target=run, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), f"trial {trial}: a thread hangs"
        assert sorted(outcomes) in (["done", "done"], ["done", "superseded"]), outcomes
