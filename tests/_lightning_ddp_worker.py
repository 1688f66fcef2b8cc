"""Run by tests/test_lightning.py: Lightning DDP on CPU (gloo), 2 processes, selection by the callback.

Lightning's "ddp" strategy starts rank 1 by running this script again; each rank writes what it saw.
"""

import json
import os
import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sbsampler as sb  # noqa: E402
from sbsampler.integrations.lightning import SelectiveBackpropCallback  # noqa: E402


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.rows = 0
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.rows += len(batch.targets)
        self.steps += 1
        return sb.weighted_loss(F.cross_entropy(self(batch.inputs), batch.targets, reduction="none"), batch.weights)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: str, strategy: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    model = Net()
    cb = SelectiveBackpropCallback(strategy, fraction=None if strategy == "infobatch" else 0.25, seed=0, log=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"rows": model.rows, "steps": model.steps, "global_step": trainer.global_step,
                   "yielded": cb.selector.stats.samples_yielded, "padded": cb.selector.stats.samples_padded,
                   "seen": cb.selector.stats.samples_seen,
                   "weight0": float(model.net[0].weight.sum())}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
