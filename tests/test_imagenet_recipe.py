"""The ImageNet example held to FFCV's ``libffcv/ffcv-imagenet`` recipe, config by config.

The reference's rules are written out here from its ``train_imagenet.py`` and its 12
configs (commit 4dd291a): ``get_cyclic_lr``/``get_step_lr`` per epoch, the per-iteration
line ``np.interp(ix, [0, iters], [lr(e), lr(e + 1)])``, ``get_resolution``, BlurPool
before strided convolutions with >= 16 input channels, no weight decay on parameters
named ``bn``. The example's own functions must give the same numbers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if os.environ.get("SBSAMPLER_REQUIRE_FFCV") != "1":
    pytest.importorskip("fastargs")
import yaml  # noqa: E402 - installed with fastargs by scripts/install_ffcv.sh

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ffcv_imagenet"
IMAGENET_TRAIN = 1_281_167

# -- the reference, as published ------------------------------------------------------------------------------------
RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
REFERENCE = {  # every rn18 / rn50 config: the values that differ by architecture
    "rn18": {"arch": "resnet18", "lr": 0.5, "batch_size": 1024, "world_size": 1, "distributed": 0,
             "weight_decay": 5e-5},
    "rn50": {"arch": "resnet50", "lr": 1.7, "batch_size": 512, "world_size": 8, "distributed": 1,
             "weight_decay": 1e-4},
}
COMMON = {"label_smoothing": 0.1, "momentum": 0.9, "use_blurpool": 1, "min_res": 160, "max_res": 192,
          "val_res": 256, "lr_tta": 1, "lr_peak_epoch": 2, "lr_schedule_type": "cyclic"}


def ref_cyclic(epoch, lr, epochs, peak):
    return np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0]


def ref_step(epoch, lr, epochs, ratio, length):
    if epoch >= epochs:
        return 0
    return ratio ** (epoch // length) * lr


def ref_iteration_lrs(epoch, iters, epoch_lr):
    return np.interp(np.arange(iters), [0, iters], [epoch_lr(epoch), epoch_lr(epoch + 1)])


def ref_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


# -- the example ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_imagenet_under_test", EXAMPLE / "train_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(path: Path, **overrides) -> dict:
    """The example's settings from a config file: its yaml over the example's fastargs defaults."""
    from fastargs import get_current_config

    defaults = {".".join(k): get_current_config().entries[k].default for k in get_current_config().entries}
    flat = dict(defaults)
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    flat.update(overrides)
    return flat


CONFIGS = [(arch, epochs) for arch in ("rn18", "rn50") for epochs in RAMPS]


@pytest.mark.parametrize("arch,epochs", CONFIGS, ids=[f"{a}_{e}" for a, e in CONFIGS])
def test_settings_match_the_reference_config(example, arch, epochs):
    cfg = config(EXAMPLE / f"{arch}_configs" / f"{arch}_{epochs}_epochs.yaml")
    ref = {**REFERENCE[arch], **COMMON}
    start, end = RAMPS[epochs]
    assert cfg["model.arch"] == ref["arch"] and cfg["training.epochs"] == epochs
    assert (cfg["training.batch_size"], cfg["dist.world_size"], cfg["training.distributed"]) == (
        ref["batch_size"], ref["world_size"], ref["distributed"])
    assert float(cfg["training.weight_decay"]) == ref["weight_decay"]
    assert (cfg["training.label_smoothing"], cfg["training.momentum"], cfg["training.use_blurpool"]) == (
        ref["label_smoothing"], ref["momentum"], ref["use_blurpool"])
    assert (cfg["resolution.min_res"], cfg["resolution.max_res"], cfg["resolution.start_ramp"],
            cfg["resolution.end_ramp"]) == (ref["min_res"], ref["max_res"], start, end)
    assert (cfg["validation.resolution"], cfg["validation.lr_tta"]) == (ref["val_res"], ref["lr_tta"])
    assert (cfg["lr.lr_schedule_type"], cfg["lr.lr_peak_epoch"]) == (ref["lr_schedule_type"], ref["lr_peak_epoch"])
    # the reference's own global batch runs at its LR; the config says which batch that LR is for
    assert example.global_batch(cfg) == ref["batch_size"] * ref["world_size"]
    assert example.peak_lr(cfg) == pytest.approx(ref["lr"])


@pytest.mark.parametrize("arch,epochs", CONFIGS, ids=[f"{a}_{e}" for a, e in CONFIGS])
def test_every_iterations_lr_and_every_epochs_resolution_match(example, arch, epochs):
    cfg = config(EXAMPLE / f"{arch}_configs" / f"{arch}_{epochs}_epochs.yaml")
    ref = REFERENCE[arch]
    iters = IMAGENET_TRAIN // (ref["batch_size"] * ref["world_size"])  # drop_last=True
    lr_at = example.lr_schedule(cfg)
    for e in range(epochs):
        expected = ref_iteration_lrs(e, iters, lambda x: ref_cyclic(x, ref["lr"], epochs, 2))
        got = np.array([lr_at(e + ix / iters) for ix in range(iters)])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
        assert example.resolution_at(e, cfg) == ref_resolution(e, 160, 192, *reversed(RAMPS[epochs]))


def test_one_process_on_an_rn50_config_keeps_the_lr_per_sample(example):
    cfg = config(EXAMPLE / "rn50_configs" / "rn50_16_epochs.yaml", **{"training.distributed": 0})
    assert example.global_batch(cfg) == 512
    assert example.peak_lr(cfg) == pytest.approx(1.7 * 512 / 4096)


@pytest.mark.parametrize("lr,epochs,ratio,length", [(0.5, 16, 0.1, 5), (1.0, 30, 0.5, 7)])
def test_the_step_schedule_ramps_into_each_drop_as_the_reference(example, lr, epochs, ratio, length):
    cfg = config(EXAMPLE / "rn18_configs" / "rn18_16_epochs.yaml", **{
        "lr.lr_schedule_type": "step", "lr.lr": lr, "lr.lr_batch_size": 0, "training.epochs": epochs,
        "lr.step_ratio": ratio, "lr.step_length": length})
    lr_at, iters = example.lr_schedule(cfg), 50
    for e in range(epochs):
        expected = ref_iteration_lrs(e, iters, lambda x: ref_step(x, lr, epochs, ratio, length))
        np.testing.assert_allclose([lr_at(e + ix / iters) for ix in range(iters)], expected, rtol=1e-12)


def test_blurpool_is_the_reference_filter_before_the_strided_convolutions():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from resnets import BlurPoolConv2d, apply_blurpool, resnet

    for arch in ("resnet18", "resnet50"):
        model, _ = resnet(arch, num_classes=10)
        strided = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1]
        assert apply_blurpool(model) == sum(m.in_channels >= 16 for m in strided) == 6
        wrapped = [m for m in model.modules() if isinstance(m, BlurPoolConv2d)]
        assert all(max(b.conv.stride) > 1 and b.conv.in_channels >= 16 for b in wrapped)
        assert not any(isinstance(p, torch.nn.Parameter) for p in (b.blur_filter for b in wrapped))
    conv = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 12, 12)
    filt = (torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0).repeat(16, 1, 1, 1)  # the reference's
    expected = conv(F.conv2d(x, filt, stride=1, padding=(1, 1), groups=16, bias=None))
    torch.testing.assert_close(BlurPoolConv2d(conv)(x), expected)


def test_weight_decay_exempts_what_the_reference_exempts():
    """Parameters named "bn": every BatchNorm of a torchvision ResNet but the shortcuts' (``downsample.1``)."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from ffcv_common import reference_param_groups
    from resnets import resnet

    model, _ = resnet("resnet50", num_classes=10)
    no_decay, decay = reference_param_groups(model, 1e-4)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    shortcut_bn = {id(p) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                   and ("short" in name or "downsample" in name) for p in m.parameters()}
    other_bn = {id(p) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                and not ("short" in name or "downsample" in name) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == other_bn
    assert shortcut_bn and shortcut_bn <= {id(p) for p in decay["params"]}
