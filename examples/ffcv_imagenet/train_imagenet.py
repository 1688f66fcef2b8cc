"""ImageNet training with FFCV and Selective Backprop, after FFCV's ImageNet example.

    python examples/ffcv_imagenet/train_imagenet.py \\
        --config-file examples/ffcv_imagenet/rn18_configs/rn18_16_epochs.yaml \\
        --data.train_dataset=/path/to/train.beton --data.val_dataset=/path/to/val.beton \\
        --selection.strategy=gradmatch --selection.fraction=0.25

Same structure and configs as FFCV's ``ffcv-imagenet``: ResNet-18/50 for 16-88 epochs,
SGD with a cyclic (triangular) LR set every iteration, label smoothing, progressive
resizing (``resolution.min_res`` -> ``max_res`` between ``start_ramp`` and
``end_ramp``), no weight decay on BatchNorm, channels-last, and AMP (float16) on GPU.
The ``selection`` section picks the mode, the strategy (``full`` for plain
training), the fraction, rebatching and the start/end window. ``selection.mode=batch``
selects within each loaded batch (``SelectiveLoader``); ``selection.mode=sampler``
chooses per epoch which images to load at all, from the losses the training step
stored in earlier epochs (``SelectiveSampler``, with ``max_staleness`` and ``anneal``).

LR schedule: set every iteration from training progress in epochs, so it is
unchanged when selection changes the number of optimiser steps per epoch. Per
batch, progress = epoch + FFCV batches consumed / FFCV batches per epoch; in
sampler mode, epoch + steps / this epoch's ``len()`` (read afresh each epoch).

The ``.beton`` files need an ``index`` field: write them with
``sbsampler.ffcv.write_beton`` (or add ``IntField()`` named ``index`` holding the
sample's index to FFCV's ``write_imagenet.py``). Models come from
``torchvision.models`` where it imports, else ``examples/resnets.py``.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fastargs import Param, Section, get_current_config
from fastargs.validation import OneOf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from ffcv_common import (  # noqa: E402
    SAMPLER_STRATEGIES, cyclic_lr, evaluate, image_pipeline, label_pipeline, param_groups, score_sampler,
    selective_loader, step_lr, train_epoch,
)
from resnets import resnet  # noqa: E402

import sbsampler as sb  # noqa: E402

Section("model", "model details").params(
    arch=Param(OneOf(["resnet18", "resnet50"]), default="resnet18"),
)
Section("resolution", "resolution scheduling").params(
    min_res=Param(int, "the minimum (starting) resolution", default=160),
    max_res=Param(int, "the maximum (final) resolution", default=192),
    end_ramp=Param(int, "epoch at which the resolution reaches max_res", default=13),
    start_ramp=Param(int, "epoch at which the resolution starts to grow", default=11),
)
Section("data", "data").params(
    train_dataset=Param(str, "training .beton (with an 'index' field)", default=""),
    val_dataset=Param(str, "validation .beton", default=""),
    num_workers=Param(int, "FFCV decoding threads", default=12),
    in_memory=Param(int, "does the dataset fit in memory? (1/0)", default=1),
    num_classes=Param(int, "number of classes", default=1000),
)
Section("lr", "learning-rate schedule").params(
    lr_schedule_type=Param(OneOf(["cyclic", "step"]), default="cyclic"),
    lr=Param(float, "peak learning rate", default=0.5),
    lr_peak_epoch=Param(float, "epoch at which the cyclic LR peaks", default=2),
    step_ratio=Param(float, "step schedule ratio", default=0.1),
    step_length=Param(int, "step schedule length (epochs)", default=30),
)
Section("logging", "logging").params(
    folder=Param(str, "where to write log.json", default="/tmp/sbsampler_imagenet"),
)
Section("validation", "validation").params(
    batch_size=Param(int, "validation batch size", default=512),
    resolution=Param(int, "validation resolution", default=256),
    lr_tta=Param(int, "average with the horizontally flipped image (1/0)", default=1),
)
Section("training", "training").params(
    batch_size=Param(int, "batch size of the FFCV loader (before selection)", default=1024),
    epochs=Param(int, "number of epochs", default=16),
    momentum=Param(float, "SGD momentum", default=0.9),
    weight_decay=Param(float, "weight decay (not on BatchNorm)", default=5e-5),
    label_smoothing=Param(float, "label smoothing", default=0.1),
    max_steps=Param(int, "stop each epoch after this many steps (0: no limit; for smoke tests)", default=0),
    seed=Param(int, "seed for order and selection", default=0),
)
Section("selection", "Selective Backprop").params(
    mode=Param(OneOf(["batch", "sampler"]), "select within each batch, or which images to load", default="batch"),
    strategy=Param(OneOf(list(sb.STRATEGIES)), f"sampler mode: one of {', '.join(SAMPLER_STRATEGIES)}",
                   default="uniform"),
    fraction=Param(float, "fraction of each batch (sampler mode: of the scored images) to back-propagate",
                   default=0.25),
    rebatch=Param(int, "batch mode: refill full batches from selected samples (1/0)", default=0),
    start=Param(float, "batch mode: selective window start, fraction of the epochs", default=0.0),
    end=Param(float, "batch mode: selective window end, fraction of the epochs", default=1.0),
    max_staleness=Param(int, "sampler mode: reload an image at least every N epochs (0: never forced)", default=0),
    anneal=Param(float, "sampler mode: share of the final epochs that load the full data", default=0.0),
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
CROP_RATIO = 224 / 256


def resolution_at(epoch: int, cfg) -> int:
    """Progressive resizing: min_res until start_ramp, then up to max_res by end_ramp (multiples of 32)."""
    lo, hi = cfg["resolution.min_res"], cfg["resolution.max_res"]
    start, end = cfg["resolution.start_ramp"], cfg["resolution.end_ramp"]
    if epoch <= start:
        return lo
    if epoch >= end:
        return hi
    return int(np.round(np.interp(epoch, [start, end], [lo, hi]) / 32)) * 32


def make_loaders(cfg, device: torch.device, sampler: Optional[sb.SelectiveSampler] = None):
    """Train loader (random order, or ``sampler``'s plan), val loader, and the train decoder (for resizing)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    res = resolution_at(0, cfg)
    decoder = RandomResizedCropRGBImageDecoder((res, res))
    train = Loader(
        cfg["data.train_dataset"], batch_size=cfg["training.batch_size"], num_workers=cfg["data.num_workers"],
        order=OrderOption.RANDOM if sampler is None else sb.ffcv.selective_order(sampler),
        os_cache=bool(cfg["data.in_memory"]), drop_last=True, seed=cfg["training.seed"],
        pipelines={
            "image": image_pipeline([decoder, RandomHorizontalFlip()], device, IMAGENET_MEAN, IMAGENET_STD),
            "label": label_pipeline(device),
            "index": label_pipeline(),
        })
    vres = cfg["validation.resolution"]
    val = Loader(
        cfg["data.val_dataset"], batch_size=cfg["validation.batch_size"], num_workers=cfg["data.num_workers"],
        order=OrderOption.SEQUENTIAL, drop_last=False,
        pipelines={
            "image": image_pipeline([CenterCropRGBImageDecoder((vres, vres), ratio=CROP_RATIO)], device,
                                    IMAGENET_MEAN, IMAGENET_STD),
            "label": label_pipeline(device),
            "index": None,
        })
    return train, val, decoder


def main() -> dict:
    """Parse ``--section.name=value`` / ``--config-file`` (fastargs), train, evaluate, log."""
    cfg = get_current_config()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    cfg.augment_argparse(parser)
    cfg.collect_argparse_args(parser)
    cfg.validate(mode="stderr")
    for key in ("data.train_dataset", "data.val_dataset"):
        if not cfg[key] or not Path(cfg[key]).is_file():
            print(f"--{key} is {cfg[key]!r}: not a file.\n"
                  "ImageNet .beton files go there: write train and val with sbsampler.ffcv.write_beton(dataset, path)\n"
                  "(or FFCV's write_imagenet.py plus an IntField named 'index'), then pass\n"
                  "  --data.train_dataset=/path/to/train.beton --data.val_dataset=/path/to/val.beton")
            raise SystemExit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg["training.seed"])
    amp_dtype = torch.float16 if device.type == "cuda" else None
    model, model_name = resnet(cfg["model.arch"], num_classes=cfg["data.num_classes"])
    model = model.to(device).to(memory_format=torch.channels_last)
    epochs = cfg["training.epochs"]
    store = sampler = None
    if cfg["selection.mode"] == "sampler":
        store, sampler = score_sampler(cfg["data.train_dataset"], cfg["selection.strategy"], cfg["selection.fraction"],
                                       cfg["selection.max_staleness"], cfg["selection.anneal"], epochs,
                                       cfg["training.seed"])
    train, val, decoder = make_loaders(cfg, device, sampler)
    if sampler is not None:
        loader = sb.WeightedBatches(train, sampler)
    else:
        loader = selective_loader(train, model, cfg["selection.strategy"], cfg["selection.fraction"],
                                  bool(cfg["selection.rebatch"]), cfg["selection.start"], cfg["selection.end"],
                                  epochs, cfg["training.label_smoothing"], amp_dtype, cfg["training.seed"])
    opt = torch.optim.SGD(param_groups(model, cfg["training.weight_decay"]), lr=cfg["lr.lr"],
                          momentum=cfg["training.momentum"])
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    if cfg["lr.lr_schedule_type"] == "cyclic":
        def lr_at(p): return cyclic_lr(p, cfg["lr.lr"], epochs, cfg["lr.lr_peak_epoch"])
    else:
        def lr_at(p): return step_lr(p, cfg["lr.lr"], epochs, cfg["lr.step_ratio"], cfg["lr.step_length"])
    print(f"model {model_name} on {device}; selection {loader!r}")
    log = []
    for epoch in range(epochs):
        res = resolution_at(epoch, cfg)
        decoder.output_size = (res, res)
        row = train_epoch(model, loader, opt, lr_at, epoch, cfg["training.label_smoothing"], scaler, amp_dtype,
                          channels_last=True, max_steps=cfg["training.max_steps"] or None, store=store)
        row["resolution"] = res
        log.append(row)
        print(json.dumps(row))
    stats = evaluate(model, val, amp_dtype, channels_last=True, flip_tta=bool(cfg["validation.lr_tta"]))
    backprop = sum(row["samples_backprop"] for row in log)
    loaded = loader.stats.samples_seen if sampler is None else backprop
    result = {"model": model_name, "device": str(device), "mode": cfg["selection.mode"], **stats, "epochs": log,
              "samples_loaded": loaded, "samples_backprop": backprop,
              "loader_stats": loader.stats.as_dict() if sampler is None else None}
    folder = Path(cfg["logging.folder"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.json").write_text(json.dumps(result, indent=2))
    print(f"top_1 {stats['top_1']:.4f} top_5 {stats['top_5']:.4f}; "
          f"loaded {loaded} samples, back-propagated {backprop}; "
          f"log in {folder / 'log.json'}")
    return result


if __name__ == "__main__":
    main()
