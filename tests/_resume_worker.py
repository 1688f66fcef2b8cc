"""Helper process for tests/test_resume.py: train, stop mid-epoch, resume elsewhere.

    python _resume_worker.py full   OUT.json
    python _resume_worker.py stop   OUT.json CKPT STEP
    python _resume_worker.py resume OUT.json CKPT

Runs every configuration in CONFIGS for two epochs and writes, per
configuration, the (indices, weights) of each step taken in this process.
"""

from __future__ import annotations

import json
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import sbsampler as sb

torch.set_num_threads(1)
CONFIGS = [
    {"strategy": "uniform", "rebatch": False},
    {"strategy": "sb", "rebatch": True},
    {"strategy": "gradmatch", "rebatch": True},
    {"strategy": "importance", "rebatch": False},
    {"strategy": "topk", "rebatch": True},
]
EPOCHS = 2


def build(cfg):
    x, y = load_digits(return_X_y=True)
    ds = sb.with_indices(TensorDataset(torch.tensor(x[:600] / 16.0, dtype=torch.float32), torch.tensor(y[:600])))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=50, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sel = sb.SelectiveLoader(loader, sb.ScoringHook(model), cfg["strategy"],
                             fraction=sb.strategies.fraction_for(cfg["strategy"], 0.3),
                             rebatch=cfg["rebatch"], seed=7)
    return sampler, model, opt, sel


def train(sampler, model, opt, sel, stop_at=None, record=None):
    """Train to the end of EPOCHS (or until ``stop_at`` steps have run in this process)."""
    steps = 0
    while sel.next_epoch < EPOCHS:  # after a mid-epoch load, next_epoch is the epoch to finish
        sampler.set_epoch(sel.next_epoch)
        for batch in sel:
            loss = nn.functional.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
            opt.zero_grad()
            sb.weighted_loss(loss, batch.weights).backward()
            opt.step()
            record.append([batch.indices.tolist(), [round(float(w), 7) for w in batch.weights]])
            steps += 1
            if stop_at is not None and steps == stop_at:
                return
    return


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    results = {}
    ckpts = {}
    if mode == "resume":
        ckpts = torch.load(sys.argv[3], weights_only=True)
    for j, cfg in enumerate(CONFIGS):
        sampler, model, opt, sel = build(cfg)
        record: list = []
        if mode == "full":
            train(sampler, model, opt, sel, record=record)
        elif mode == "stop":
            train(sampler, model, opt, sel, stop_at=int(sys.argv[4]), record=record)
            ckpts[j] = {"model": model.state_dict(), "opt": opt.state_dict(), "loader": sel.state_dict()}
        else:
            model.load_state_dict(ckpts[j]["model"])
            opt.load_state_dict(ckpts[j]["opt"])
            sel.load_state_dict(ckpts[j]["loader"])
            train(sampler, model, opt, sel, record=record)
        results[j] = {"steps": record, "stats": sel.stats.as_dict()}
    if mode == "stop":
        torch.save(ckpts, sys.argv[3])
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
