"""CIFAR-sized training with FFCV and Selective Backprop: a ResNet-18 on 32x32 images.

    python examples/cifar_ffcv.py --train cifar_train.beton --val cifar_test.beton --strategy gradmatch
    python examples/cifar_ffcv.py --synthetic 512 --epochs 1      # generated images, runs anywhere
    python examples/cifar_ffcv.py --synthetic 512 --epochs 4 --batch-size 64 --mode sampler --strategy infobatch

``.beton`` files need an ``index`` field: write them with
``sbsampler.ffcv.write_beton(dataset, path)`` (any indexable ``(image, label)``
dataset, e.g. torchvision's CIFAR10 on a machine that has it). ``--synthetic N``
writes N generated 32x32 images to a temporary folder instead, so the example runs
offline. One-cycle (triangular) LR per iteration of the wrapped FFCV loader, label
smoothing, channels-last, AMP on GPU; ResNet from torchvision where it imports,
else ``examples/resnets.py``.

``--mode batch`` (default) selects within each loaded batch (``SelectiveLoader``);
``--mode sampler`` decides per epoch which samples to load at all, from the losses
the training step stored in earlier epochs (``SelectiveSampler``; the first epoch
loads everything). Epochs then have fewer steps; the LR schedule is per epoch and
reads each epoch's length afresh, so it still ends at the last step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ffcv_common import (  # noqa: E402
    SAMPLER_STRATEGIES, cyclic_lr, evaluate, image_pipeline, label_pipeline, param_groups, score_sampler,
    selective_loader, train_epoch,
)
from resnets import resnet  # noqa: E402

import sbsampler as sb  # noqa: E402

CIFAR_MEAN = np.array([125.307, 122.961, 113.8575])
CIFAR_STD = np.array([51.5865, 50.847, 51.255])


def synthetic_betons(n: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` train and ``n // 4`` val generated 32x32 images (class = a colour pattern)."""
    from sbsampler.ffcv import write_beton

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(10, 3))

    def make(count: int) -> list:
        labels = rng.integers(0, 10, size=count)
        noise = rng.integers(-40, 40, size=(count, 32, 32, 3))
        imgs = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return [(imgs[i], int(labels[i])) for i in range(count)]

    return (write_beton(make(n), folder / "train.beton"), write_beton(make(max(n // 4, 1)), folder / "val.beton"))


def loaders(train_path: Path, val_path: Path, batch_size: int, workers: int, device: torch.device, seed: int,
            sampler: Optional[sb.SelectiveSampler] = None):
    """Train loader (random order, or ``sampler``'s plan) and sequential val loader."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    order = OrderOption.RANDOM if sampler is None else sb.ffcv.selective_order(sampler)
    train = Loader(str(train_path), batch_size=batch_size, num_workers=workers, order=order, seed=seed,
                   drop_last=True, pipelines={
                       "image": image_pipeline([SimpleRGBImageDecoder(), RandomHorizontalFlip()], device,
                                               CIFAR_MEAN, CIFAR_STD),
                       "label": label_pipeline(device), "index": label_pipeline()})
    val = Loader(str(val_path), batch_size=512, num_workers=workers, order=OrderOption.SEQUENTIAL, drop_last=False,
                 pipelines={"image": image_pipeline([SimpleRGBImageDecoder()], device, CIFAR_MEAN, CIFAR_STD),
                            "label": label_pipeline(device), "index": None})
    return train, val


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, help="training .beton (with an 'index' field)")
    parser.add_argument("--val", type=Path, help="validation .beton")
    parser.add_argument("--synthetic", type=int, default=0, help="write N generated images instead")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--lr-peak-epoch", type=float, default=None,
                        help="epoch of the LR peak (default 5/24 of --epochs: the reference's 5 of 24)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--mode", default="batch", choices=["batch", "sampler"],
                        help="select within each batch, or choose which samples to load each epoch")
    parser.add_argument("--strategy", default="uniform", choices=list(sb.STRATEGIES),
                        help=f"--mode sampler takes {', '.join(SAMPLER_STRATEGIES)}")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--rebatch", action="store_true", help="--mode batch: refill full batches")
    parser.add_argument("--lookahead", type=int, default=0,
                        help="--mode batch: steps prepared ahead of the training step (sbsampler.lookahead)")
    parser.add_argument("--max-staleness", type=int, default=0,
                        help="--mode sampler: reload a sample at least every N epochs (0: never forced)")
    parser.add_argument("--anneal", type=float, default=0.0,
                        help="--mode sampler: share of the final epochs that load the full data")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--end", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lr_peak_epoch is None:
        args.lr_peak_epoch = args.epochs * 5 / 24
    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory()
        args.train, args.val = synthetic_betons(args.synthetic, Path(tmp.name), args.seed)
    if not (args.train and args.train.is_file() and args.val and args.val.is_file()):
        parser.error("pass --train and --val .beton files (written with sbsampler.ffcv.write_beton), or --synthetic N")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    model, name = resnet("resnet18", num_classes=10, small_input=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    store = sampler = None
    if args.mode == "sampler":
        store, sampler = score_sampler(args.train, args.strategy, args.fraction, args.max_staleness, args.anneal,
                                       args.epochs, args.seed)
    train, val = loaders(args.train, args.val, args.batch_size, args.workers, device, args.seed, sampler)
    if sampler is not None:
        loader = sb.WeightedBatches(train, sampler)
    else:
        loader = selective_loader(train, model, args.strategy, args.fraction, args.rebatch, args.start, args.end,
                                  args.epochs, args.label_smoothing, amp_dtype, args.seed, args.lookahead)
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    print(f"model {name} on {device}; {loader!r}")
    log = []
    for epoch in range(args.epochs):
        row = train_epoch(model, loader, opt, lambda p: cyclic_lr(p, args.lr, args.epochs, args.lr_peak_epoch),
                          epoch, args.label_smoothing, scaler, amp_dtype, channels_last=True, store=store)
        log.append(row)
        print(json.dumps(row))
    stats = evaluate(model, val, amp_dtype, channels_last=True)
    if sampler is None:
        print(f"top_1 {stats['top_1']:.4f}; back-propagated {loader.stats.samples_yielded} of "
              f"{loader.stats.samples_seen} samples")
    else:
        loaded = sum(row["samples_backprop"] for row in log)
        print(f"top_1 {stats['top_1']:.4f}; loaded and back-propagated {loaded} of "
              f"{len(store) * args.epochs} samples ({args.epochs} epochs of {len(store)})")
    if tmp is not None:
        tmp.cleanup()
    return {**stats, "epochs": log, "loader_stats": loader.stats.as_dict() if sampler is None else None}


if __name__ == "__main__":
    main()
