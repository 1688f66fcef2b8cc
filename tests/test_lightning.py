"""Lightning: selection through SelectiveBackpropCallback, on CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb

from conftest import need  # noqa: E402

L = need("lightning.pytorch")
from sbsampler.integrations.lightning import SelectiveBackpropCallback  # noqa: E402

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.seen = []  # (rows, weighted loss returned, sum w*l recomputed) per step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, sb.SubBatch)
        losses = F.cross_entropy(self(batch.inputs), batch.targets, reduction="none")
        loss = sb.weighted_loss(losses, batch.weights)
        self.seen.append((len(batch.targets), float(loss), float((losses * batch.weights).sum())))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        assert isinstance(x, torch.Tensor)  # validation batches are not selected
        self.log("val_loss", F.cross_entropy(self(x), y), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def fit(strategy, epochs, ckpt_dir=None, ckpt_path=None, val=False):
    torch.manual_seed(0)
    model = Net()
    cb = SelectiveBackpropCallback(strategy, fraction=None if strategy == "infobatch" else 0.25, seed=0)
    callbacks = [cb]
    if ckpt_dir is not None:
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1))
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=ckpt_dir is not None,
                        num_sanity_val_steps=0, **TRAINER)
    trainer.fit(model, DataLoader(data(), batch_size=16), DataLoader(data(32, 1), batch_size=16) if val else None,
                ckpt_path=ckpt_path)
    return model, cb, trainer


@pytest.mark.parametrize("strategy", ["uniform", "sb", "gradmatch", "infobatch"])
def test_rows_and_weights_reach_training_step(strategy):
    model, cb, trainer = fit(strategy, 1, val=True)
    stats = cb.selector.stats
    assert len(model.seen) == trainer.global_step == 10  # one step per batch: Lightning's own count
    assert sum(r for r, _, _ in model.seen) == stats.samples_yielded + stats.samples_padded
    assert stats.samples_seen == 160
    for _, loss, ref in model.seen:
        assert loss == pytest.approx(ref, rel=1e-6)
    if strategy in ("uniform", "sb", "gradmatch"):
        assert stats.samples_yielded == 40  # 4 of each 16
    assert "sb/backprop_fraction" in trainer.callback_metrics


def _grab(model, cb, field, steps):
    """``field`` of the SubBatch that training_step gets, for each of ``steps`` steps of a fit with ``cb``."""
    grabbed = []
    original = type(model).training_step

    def step(self, batch, i):
        grabbed.append(getattr(batch, field).clone())
        return original(self, batch, i)

    model.training_step = step.__get__(model)
    L.Trainer(max_steps=steps, callbacks=[cb], enable_checkpointing=False, **TRAINER).fit(
        model, DataLoader(data(), batch_size=16))
    return grabbed


def test_weights_are_the_selectors():
    """The loss Lightning back-propagates is sum w_i l_i with the selector's weights (importance: unequal)."""
    torch.manual_seed(0)
    cb = SelectiveBackpropCallback("importance", fraction=0.5, seed=0, log=False)
    grabbed = _grab(Net(), cb, "weights", steps=3)
    assert len(grabbed) == 3 and all(len(w) == 8 for w in grabbed)
    assert any(float(w.std()) > 0 for w in grabbed)  # importance weights differ across rows
    for w in grabbed:
        assert float(w.sum()) == pytest.approx(1.0, rel=0.5)


def test_exact_resume_from_lightning_checkpoint(tmp_path):
    straight, _, _ = fit("sb", 2)
    fit("sb", 1, ckpt_dir=tmp_path)
    ckpt = sorted(tmp_path.glob("*.ckpt"))[-1]
    state = torch.load(ckpt, weights_only=True)  # the callback's state loads with torch's safe unpickler
    assert any("SelectiveBackprop" in k for k in state["callbacks"])
    resumed, cb, _ = fit("sb", 2, ckpt_path=str(ckpt))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cb.selector.stats.samples_seen == 320  # counters continued from the checkpoint


def test_bypassed_hook_is_loud():
    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(data(), batch_size=16)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch

    trainer = L.Trainer(max_steps=1, callbacks=[SelectiveBackpropCallback("uniform")], enable_checkpointing=False,
                        **TRAINER)
    with pytest.raises(RuntimeError, match="bypassed"):
        trainer.fit(Net(), datamodule=DM())


@pytest.mark.slow
def test_ddp_two_ranks_step_together(tmp_path):
    """strategy='ddp' on CPU (gloo), 2 processes: equal steps, InfoBatch's varying counts included."""
    worker = os.path.join(os.path.dirname(__file__), "_lightning_ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    subprocess.run([sys.executable, worker, str(tmp_path), "infobatch"], check=True, env=env, timeout=300,
                   cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == r["global_step"] == 14  # 200 samples / 2 ranks / 16 = 7 batches, 2 epochs
        assert r["rows"] == r["yielded"] + r["padded"]
        assert r["seen"] == 200
    assert ranks[0]["weight0"] == pytest.approx(ranks[1]["weight0"], abs=1e-6)  # DDP kept the replicas equal


def test_the_gpu_checks_are_read_at_each_epoch_end(monkeypatch):
    """The hook's deferred checks (read late on a GPU) are flushed when each training epoch ends."""
    from sbsampler.deferred import DeferredChecks

    calls = []
    monkeypatch.setattr(DeferredChecks, "flush", lambda self: calls.append(self))
    model, cb, trainer = fit("sb", 2)
    assert len(calls) == 2 and all(c is cb.hook.checks for c in calls)


def _first_step_inputs(model, cb):
    return _grab(model, cb, "inputs", steps=1)[0]


def test_a_callback_reused_for_another_module_scores_that_module():
    """A callbacks list reused across a sweep: the second fit scored the first module (issue 22, item 3)."""
    cb = SelectiveBackpropCallback("topk", fraction=0.25, seed=0, log=False)
    torch.manual_seed(0)
    _first_step_inputs(Net(), cb)
    torch.manual_seed(1)
    second = Net()
    x, y = data().tensors
    with torch.no_grad():
        expected = x[:16][F.cross_entropy(second(x[:16]), y[:16], reduction="none").topk(4).indices.sort().values]
    got = _first_step_inputs(second, cb)
    assert cb.hook.model is second
    torch.testing.assert_close(got, expected)  # the top 4 of the second module's losses
    assert cb.selector.stats.samples_seen == 16  # a new fit starts its own counters


def test_a_hook_on_another_module_is_refused():
    cb = SelectiveBackpropCallback("topk", hook=sb.ScoringHook(Net()), log=False)
    trainer = L.Trainer(max_steps=1, callbacks=[cb], enable_checkpointing=False, **TRAINER)
    with pytest.raises(ValueError, match="scores a model that is not the LightningModule being fit"):
        trainer.fit(Net(), DataLoader(data(), batch_size=16))
    torch.manual_seed(0)
    module = Net()
    _first_step_inputs(module, SelectiveBackpropCallback("topk", hook=sb.ScoringHook(module.net),
                                                         log=False))  # a submodule


# -- two things named SelectiveBackprop (issue 31, item 12) ------------------------------------------------------------

def test_the_callback_has_a_name_of_its_own_and_the_old_one_still_works():
    from sbsampler.integrations.lightning import SelectiveBackprop as OldName

    with pytest.warns(FutureWarning, match="now SelectiveBackpropCallback"):
        old = OldName("topk", fraction=0.25, seed=0, log=False)
    new = SelectiveBackpropCallback("topk", fraction=0.25, seed=0, log=False)
    assert isinstance(old, SelectiveBackpropCallback)
    assert old.state_key == new.state_key == "SelectiveBackprop"  # checkpoints of either restore into the other


def test_the_strategy_where_the_callback_belongs_says_what_to_pass():
    with pytest.raises(TypeError, match=r"is a selection strategy, not a Lightning callback: pass .*"
                                        r"SelectiveBackpropCallback"):
        L.Trainer(max_steps=1, callbacks=[sb.SelectiveBackprop()], enable_checkpointing=False, **TRAINER)
    with pytest.raises(TypeError, match=r"sbsampler.SelectiveBackprop is the strategy .* got keyword fraction=.*"
                                        r"SelectiveBackpropCallback"):
        sb.SelectiveBackprop("sb", fraction=0.25)
    with pytest.raises(TypeError, match=r"got 'sb' as beta"):
        sb.SelectiveBackprop("sb")


def test_unpacking_a_sub_batch_into_two_names_the_fields():
    class Unpacking(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch  # written for (inputs, targets) batches
            return F.cross_entropy(self(x), y)

    trainer = L.Trainer(max_steps=1, callbacks=[SelectiveBackpropCallback("uniform", log=False)],
                        enable_checkpointing=False, **TRAINER)
    with pytest.raises(ValueError, match=r"a SubBatch unpacks into 4 values \(x, y, w, idx = batch\), not 2: read "
                                         r"batch.inputs, batch.targets and batch.weights"):
        trainer.fit(Unpacking(), DataLoader(data(), batch_size=16))
