"""The wrapped loader's own state: torchdata's StatefulDataLoader hands off on resume; FFCV's epoch counter."""

import io

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import sbsampler as sb
from sbsampler.strategies import fraction_for

from conftest import need, record_steps as steps  # noqa: E402

stateful = need("torchdata.stateful_dataloader")
StatefulDataLoader = stateful.StatefulDataLoader


class Counting(Dataset):
    """80 samples of 6 features; counts how many items were read."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(80, 6, generator=g), torch.randint(0, 3, (80,), generator=g)
        self.reads = 0

    def __len__(self):
        return 80

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i], i


def inner(data, seed):
    return StatefulDataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def build(seed=0, strategy="sb"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = Counting()
    return data, sb.SelectiveLoader(inner(data, seed), sb.ScoringHook(model), strategy,
                                    fraction=fraction_for(strategy, 0.25), rebatch=True,
                                    seed=0)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stop", [1, 2])
def test_mid_epoch_resume_hands_off_to_the_stateful_loader(stop):
    """The rest of the epoch is the uninterrupted run's. (Later epochs are torchdata's: after a mid-epoch
    load_state_dict its next shuffle differs from an uninterrupted run's, with or without sbsampler.)"""
    _, ref_loader = build()
    ref = steps(ref_loader, epochs=2)
    data, loader = build()
    head = steps(loader, stop=stop)
    state = roundtrip(loader.state_dict())
    assert state["wrapped"] is not None and "state" in state["wrapped"]
    data2, resumed = build(seed=123)  # another shuffle seed: only the saved state can give the same order
    resumed.load_state_dict(state)
    rest = steps(resumed, epochs=1)
    epoch0 = 3  # 10 batches x 2 rows = 20 rows: steps of 8, 8 and a tail of 4
    assert head + rest == ref[:epoch0]
    # only the batches whose rows were still queued were read again, not the whole consumed prefix
    consumed = state["position"]
    queued_from = state["wrapped"]["position"]
    assert queued_from <= consumed
    reread = (consumed - queued_from) * 8
    assert data2.reads == 80 - consumed * 8 + reread  # this epoch's rest and the re-read


def test_resume_between_epochs_hands_the_state_over():
    """Saved between epochs, the wrapped loader's state goes with ours: the next epoch's batches are those of
    a StatefulDataLoader restored from that state (whole batches seen through strategy "full")."""
    data, loader = build(strategy="full")
    steps(loader, epochs=1)
    state = roundtrip(loader.state_dict())
    assert state["in_epoch"] is False and "state" in state["wrapped"]
    data2, resumed = build(seed=99, strategy="full")
    resumed.load_state_dict(state)
    theirs = inner(Counting(), 7)
    theirs.load_state_dict(state["wrapped"]["state"])
    assert [i for i, _ in steps(resumed, epochs=1)] == [b[2].tolist() for b in theirs]


def test_a_plain_loader_is_read_again_from_the_start():
    """Without a state of its own the wrapped loader replays the consumed batches (the old path)."""
    torch.manual_seed(0)
    data = Counting()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    dl = torch.utils.data.DataLoader(data, batch_size=8)
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), "uniform", fraction=0.25, seed=0)
    steps(loader, stop=3)
    state = loader.state_dict()
    assert state["wrapped"] is None
    data.reads = 0
    again = sb.SelectiveLoader(dl, sb.ScoringHook(model), "uniform", fraction=0.25, seed=0)
    again.load_state_dict(state)
    steps(again)
    assert data.reads == 80  # 3 batches read again, 7 new
