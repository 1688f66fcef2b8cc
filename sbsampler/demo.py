"""Demo: full backprop against every strategy on scikit-learn's digits.

Run ``python -m sbsampler.demo``. Trains the same small CNN on the 8x8 digits
(they ship inside scikit-learn: nothing is downloaded) once with full backprop
and once per strategy at ``--fraction`` of each batch, for the same number of
epochs, and prints test accuracy, samples back-propagated, wall time and the
share of that time spent on scoring and selection.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .hook import ScoringHook
from .loader import SelectiveLoader, weighted_loss, with_indices
from .strategies import STRATEGIES, get_strategy

__all__ = ["DigitsCNN", "load_digits_split", "RunResult", "train_one", "main"]


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images: two conv blocks with BatchNorm, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 digits as (N, 1, 8, 8) float tensors in [0, 1], split train/test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@dataclass
class RunResult:
    """One training run's outcome."""

    strategy: str
    test_accuracy: float
    samples_backprop: int
    samples_seen: int
    wall_time: float
    selection_time: float

    @property
    def overhead_share(self) -> float:
        """Share of wall time spent scoring, selecting and gathering."""
        return self.selection_time / self.wall_time if self.wall_time else 0.0


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode."""
    model.eval()
    correct = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / len(data)


def train_one(
    strategy: Optional[str],
    train: TensorDataset,
    test: TensorDataset,
    epochs: int = 8,
    fraction: float = 0.25,
    batch_size: int = 64,
    lr: float = 0.01,
    seed: int = 0,
) -> RunResult:
    """Train a fresh ``DigitsCNN``; ``strategy=None`` is full backprop."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(with_indices(train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    hook = ScoringHook(model)
    wrapped = None
    if strategy is not None:
        wrapped = SelectiveLoader(loader, hook, strategy=get_strategy(strategy, seed=seed), fraction=fraction)
    seen = backprop = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        if wrapped is None:
            for x, y, _idx in loader:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                seen += len(y)
                backprop += len(y)
        else:
            for batch in wrapped:
                per_sample = F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
                weighted_loss(per_sample, batch.weights).backward()
                opt.step()
                opt.zero_grad()
    wall = time.perf_counter() - t0
    hook.remove()
    if wrapped is not None:
        seen, backprop = wrapped.stats.samples_seen, wrapped.stats.samples_yielded
    return RunResult(
        strategy=strategy or "full",
        test_accuracy=accuracy(model, test),
        samples_backprop=backprop,
        samples_seen=seen,
        wall_time=wall,
        selection_time=wrapped.stats.selection_time if wrapped is not None else 0.0,
    )


def format_table(results: Sequence[RunResult]) -> str:
    """The demo's results as a fixed-width text table."""
    head = f"{'strategy':<11} {'test acc':>8} {'backprop':>9} {'of seen':>8} {'wall s':>7} {'select %':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.strategy:<11} {r.test_accuracy:>8.3f} {r.samples_backprop:>9d} "
            f"{r.samples_backprop / max(r.samples_seen, 1):>8.2f} {r.wall_time:>7.2f} {100 * r.overhead_share:>7.1f}%"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
    """Command-line entry point; returns the results it printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=[n for n in STRATEGIES if n != "infobatch"],
                        choices=list(STRATEGIES))
    args = parser.parse_args(argv)
    train, test = load_digits_split(seed=args.seed)
    print(f"digits: {len(train)} train / {len(test)} test, {args.epochs} epochs, batch {args.batch_size}, "
          f"fraction {args.fraction}")
    runs: list[Optional[str]] = [None, *args.strategies]
    results = []
    for name in tqdm(runs, desc="runs", disable=None):
        results.append(train_one(name, train, test, epochs=args.epochs, fraction=args.fraction,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed))
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
