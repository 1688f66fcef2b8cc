"""ScoringHook(scale_factor=): scoring on downscaled inputs (Composer's scale_factor), training on full size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbsampler as sb


class PoolCNN(nn.Module):
    """Global pooling before the head: any input size."""

    def __init__(self, channels=3, dims=2):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv1d, nn.AdaptiveAvgPool1d)
        self.body = nn.Sequential(conv(channels, 8, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(x.float()))


def test_scores_are_those_of_the_downscaled_inputs():
    torch.manual_seed(0)
    model = PoolCNN()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    got = sb.ScoringHook(model, scale_factor=0.5).score(x, y)
    ref = sb.ScoringHook(model).score(small, y)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.gram(), ref.gram())
    full = sb.ScoringHook(model, scale_factor=1.0).score(x, y)
    torch.testing.assert_close(full.loss, sb.ScoringHook(model).score(x, y).loss)
    assert not torch.allclose(full.loss, got.loss)


def test_integer_images_and_1d_signals():
    torch.manual_seed(0)
    model = PoolCNN()
    x = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    y = torch.randint(0, 5, (8,))
    hook = sb.ScoringHook(model, scale_factor=0.5)
    small = hook.downscale(x)
    assert small.dtype == torch.uint8 and small.shape == (8, 3, 6, 6)
    ref = F.interpolate(x.float(), scale_factor=0.5, mode="bilinear").round().to(torch.uint8)
    assert torch.equal(small, ref)
    torch.testing.assert_close(hook.score(x, y).loss, sb.ScoringHook(model).score(ref, y).loss)
    signal = torch.randn(8, 3, 40)
    assert sb.ScoringHook(PoolCNN(dims=1), scale_factor=0.25).downscale(signal).shape == (8, 3, 10)


def test_loader_trains_on_full_size_inputs():
    torch.manual_seed(0)
    model = PoolCNN()
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,))
    loader = sb.SelectiveLoader([(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)],
                                sb.ScoringHook(model, scale_factor=0.5), "topk", fraction=0.25)
    for b in loader:
        assert b.inputs.shape == (4, 3, 16, 16) and torch.equal(b.inputs, x[b.indices])


def test_refusals():
    model = PoolCNN()
    for bad in (0, 0.0, 1.5, -0.5, True, "half"):
        with pytest.raises(ValueError, match="scale_factor"):
            sb.ScoringHook(model, scale_factor=bad)
    with pytest.raises(ValueError, match="tensor inputs"):
        sb.ScoringHook(nn.Sequential(nn.Linear(6, 5)), scale_factor=0.5).score(torch.randn(4, 6),
                                                                              torch.zeros(4, dtype=torch.long))
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    with pytest.raises(RuntimeError, match="must accept the smaller size"):
        sb.ScoringHook(fixed, scale_factor=0.5).score(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
