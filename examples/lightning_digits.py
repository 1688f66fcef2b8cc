"""Selective backprop inside PyTorch Lightning: scikit-learn's digits (shipped, offline), CPU, well under a minute.

    python examples/lightning_digits.py --strategy sb --fraction 0.25 --epochs 15

Three lines make a Lightning module selective: the ``SelectiveBackpropCallback``,
``training_step`` reading ``batch.inputs``/``batch.targets``/``batch.weights``, and
``sb.weighted_loss``. Lightning keeps its loader, length and schedule: the
one-cycle LR below is built from ``trainer.estimated_stepping_batches``, which
selection does not change (one step per batch). Prints one JSON line: test
accuracy, the samples back-propagated and seen, and the selection time.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.integrations.lightning import SelectiveBackpropCallback


class DigitsNet(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: sb.SubBatch, batch_idx: int) -> torch.Tensor:
        losses = F.cross_entropy(self(batch.inputs), batch.targets, reduction="none")
        return sb.weighted_loss(losses, batch.weights)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                    total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="sb", help="a registered strategy name, or 'full'")
    parser.add_argument("--fraction", type=float, default=None,
                        help="share of each batch to back-propagate (default 0.25; not for infobatch or full)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]
    model = DigitsNet(args.lr)
    cb = SelectiveBackpropCallback(args.strategy, fraction=args.fraction, seed=args.seed)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True))
    seconds = time.perf_counter() - t0
    acc = trainer.test(model, DataLoader(TensorDataset(x[test], y[test]), batch_size=256), verbose=False)[0]
    stats = cb.selector.stats
    row = {"strategy": args.strategy, "fraction": cb.selector.fraction, "epochs": args.epochs,
           "test_acc": round(float(acc["test_acc"]), 4), "steps": trainer.global_step,
           "samples_backprop": stats.samples_yielded, "samples_seen": stats.samples_seen,
           "selection_s": round(stats.selection_time, 3), "fit_s": round(seconds, 2)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
