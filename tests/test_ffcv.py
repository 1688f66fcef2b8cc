"""FFCV path: .beton files written with indices, read through SelectiveLoader.

FFCV needs system libraries (scripts/install_ffcv.sh). Without it these tests skip,
unless SBSAMPLER_REQUIRE_FFCV=1 (set by .ci/run), where a missing FFCV fails them.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbsampler as sb
from sbsampler.strategies import fraction_for

if os.environ.get("SBSAMPLER_REQUIRE_FFCV") == "1":
    import ffcv  # noqa: F401  - must be importable in CI
else:
    pytest.importorskip("ffcv")

from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.transforms import Convert, ToTensor, ToTorchImage  # noqa: E402

from sbsampler.ffcv import FFCVBatches, _to_hwc_uint8, write_beton  # noqa: E402


@pytest.fixture(scope="module")
def digits_rgb():
    """scikit-learn digits upscaled to 16x16 RGB uint8, with labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:300], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="nearest").repeat(1, 3, 1, 1)
    imgs = (x * 255).round().to(torch.uint8)
    return imgs, torch.tensor(d.target[:300])


@pytest.fixture(scope="module")
def beton(digits_rgb, tmp_path_factory):
    imgs, labels = digits_rgb
    path = tmp_path_factory.mktemp("beton") / "digits.beton"
    write_beton([(imgs[i], int(labels[i])) for i in range(len(labels))], path)
    return path


def make_loader(path, batch_size=32, order=OrderOption.RANDOM, index=True, batches_ahead=2):
    pipelines = {
        "image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor()],
        "index": [IntDecoder(), ToTensor()] if index else None,
    }
    return Loader(str(path), batch_size=batch_size, num_workers=1, order=order, seed=0, drop_last=False,
                  pipelines=pipelines, batches_ahead=batches_ahead)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.body(x.float() / 255.0))


def test_write_beton_round_trip(beton, digits_rgb):
    imgs, labels = digits_rgb
    seen = []
    for x, y, idx in FFCVBatches(make_loader(beton)):
        assert torch.equal(x, imgs[idx]) and torch.equal(y, labels[idx])
        seen.append(idx.clone())  # FFCV's buffers are reused: keep a copy
    assert sorted(torch.cat(seen).tolist()) == list(range(len(labels)))


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sb", "gradmatch", "importance"])
def test_selective_training_from_beton(beton, digits_rgb, strategy):
    imgs, labels = digits_rgb
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = sb.SelectiveLoader(make_loader(beton), sb.ScoringHook(model), strategy=strategy,
                                fraction=fraction_for(strategy, 0.25), seed=0)
    steps = 0
    for batch in loader:
        assert torch.equal(batch.inputs, imgs[batch.indices])  # the written image of that index
        assert torch.equal(batch.targets, labels[batch.indices])
        assert batch.weights.shape == batch.targets.shape and (batch.weights >= 0).all()
        loss = sb.weighted_loss(F.cross_entropy(model(batch.inputs), batch.targets, reduction="none"), batch.weights)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == len(loader) == 10
    assert loader.stats.samples_seen == 300


def test_kept_sub_batches_survive_ffcv_buffer_reuse(beton, digits_rgb):
    imgs, _ = digits_rgb
    # Control: FFCV recycles its output buffers, so raw batches kept across steps get overwritten.
    raw = [(x, idx.clone()) for x, _, idx in FFCVBatches(make_loader(beton, batches_ahead=1))]
    assert any(not torch.equal(x, imgs[i]) for x, i in raw), "FFCV no longer reuses buffers: control is moot"
    # Rebatching keeps selected samples in a queue across FFCV batches: they must stay intact.
    torch.manual_seed(0)
    model = TinyCNN()
    loader = sb.SelectiveLoader(make_loader(beton, batches_ahead=1), sb.ScoringHook(model), strategy="uniform",
                                fraction=0.3, rebatch=True, seed=0)
    kept = list(loader)
    assert len(kept) == len(loader)
    assert all(len(b) == 32 for b in kept[:-1])
    for b in kept:
        assert torch.equal(b.inputs, imgs[b.indices])
    idx = torch.cat([b.indices for b in kept])
    assert idx.unique().numel() == idx.numel() == loader.stats.samples_selected


def test_missing_index_field_is_a_clear_error(beton):
    model = TinyCNN()
    with pytest.raises(ValueError, match="write_beton"):
        sb.SelectiveLoader(make_loader(beton, index=False), sb.ScoringHook(model))


def test_named_fields(beton):
    loader = make_loader(beton)
    with pytest.raises(ValueError, match="no input field"):
        FFCVBatches(loader, image_field="pixels")
    with pytest.raises(ValueError, match="no label field"):
        FFCVBatches(loader, label_field="target")


def test_float_pipeline_and_jpeg(tmp_path, digits_rgb):
    imgs, labels = digits_rgb
    path = write_beton([(imgs[i].float() / 255, int(labels[i])) for i in range(40)], tmp_path / "j.beton",
                       write_mode="jpg", jpeg_quality=95)
    loader = Loader(str(path), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(), Convert(torch.float32)],
                               "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})
    for x, y, idx in FFCVBatches(loader):
        assert x.dtype == torch.float32
        assert (x - imgs[idx].float()).abs().mean() < 12  # lossy, but the same picture
        assert torch.equal(y, labels[idx])


def test_image_conversion():
    gray = np.zeros((4, 5), dtype=np.uint8)
    assert _to_hwc_uint8(gray).shape == (4, 5, 3)
    assert _to_hwc_uint8(torch.ones(1, 4, 5)).max() == 255
    with pytest.raises(ValueError, match="shape"):
        _to_hwc_uint8(np.zeros((2, 4, 5, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        _to_hwc_uint8(np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="empty"):
        write_beton([], "/tmp/never.beton")


@pytest.mark.parametrize("stop", [1, 4])  # mid epoch 0; mid epoch 1 (3 steps an epoch)
def test_resume_restores_ffcvs_epoch_counter(beton, stop):
    """FFCV's order follows its next_epoch counter: the library saves it with its own state and sets it back,
    so a fresh Loader (counter 0) resumes the uninterrupted run's steps."""
    from conftest import record_steps

    def build():
        torch.manual_seed(0)
        return sb.SelectiveLoader(make_loader(beton), sb.ScoringHook(TinyCNN()), "sb", fraction=0.25, rebatch=True,
                                  seed=0)

    ref = record_steps(build(), epochs=2)
    first = build()
    head = record_steps(first, epochs=2, stop=stop)
    state = first.state_dict()
    assert state["wrapped"] == {"ffcv_epoch": state["epoch"]}
    resumed = build()
    resumed.load_state_dict(state)
    assert resumed.loader.loader.next_epoch == state["epoch"]
    epochs_left = 2 - state["epoch"]
    assert head + record_steps(resumed, epochs=epochs_left) == ref
