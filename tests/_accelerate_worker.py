"""Run by tests/test_accelerate.py in a fresh process: accelerate.debug_launcher forks 2 CPU processes (gloo).

A fresh process because forking one that has already run autograd (an earlier test) is refused by torch.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.integrations.accelerate import selective_loader


def train(out: str, strategy: str, rebatch: bool, even_batches: bool) -> None:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2,
                      dataloader_config=DataLoaderConfiguration(even_batches=even_batches))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(150, 6, generator=g), torch.randint(0, 3, (150,), generator=g)  # 150: ranks uneven
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=16)
    model, opt, dl = acc.prepare(model, opt, dl)
    loader = selective_loader(acc, dl, sb.ScoringHook(acc.unwrap_model(model)), strategy,
                              sb.strategies.fraction_for(strategy, 0.25), rebatch=rebatch,
                              seed=0)
    steps, rows, syncs = 0, 0, 0
    for _ in range(2):
        for b in loader:
            with acc.accumulate(model):
                losses = F.cross_entropy(model(b.inputs), b.targets, reduction="none")
                acc.backward(sb.weighted_loss(losses, b.weights))
                syncs += int(acc.sync_gradients)
                opt.step()
                opt.zero_grad()
            steps += 1
            rows += int((b.weights > 0).sum())
    w = acc.unwrap_model(model)[0].weight
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump({"steps": steps, "rows": rows, "syncs": syncs,
                   "yielded": loader.stats.samples_yielded, "padded": loader.stats.samples_padded,
                   "seen": loader.stats.samples_seen, "w": float(w.sum())}, f)


if __name__ == "__main__":
    debug_launcher(train, args=(sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"), num_processes=2)
