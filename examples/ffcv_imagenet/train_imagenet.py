"""ImageNet training with FFCV and Selective Backprop, after FFCV's ImageNet example.

    python examples/ffcv_imagenet/train_imagenet.py \\
        --config-file examples/ffcv_imagenet/rn18_configs/rn18_16_epochs.yaml \\
        --data.train_dataset=/path/to/train.beton --data.val_dataset=/path/to/val.beton \\
        --selection.strategy=gradmatch --selection.fraction=0.25

FFCV's ``libffcv/ffcv-imagenet`` recipe (``train_imagenet.py`` and its 12 rn18/rn50
configs, ``tests/test_imagenet_recipe.py`` holds the example to them): ResNet-18/50 for
16-88 epochs with BlurPool (``training.use_blurpool``); SGD whose LR is set before every
iteration ``ix`` of epoch ``e`` on the line from the epoch's value to the next epoch's
(``lr(e) + (lr(e + 1) - lr(e)) ix / iters``, cyclic or step); label smoothing;
progressive resizing (``resolution.min_res`` -> ``max_res`` between ``start_ramp`` and
``end_ramp``, multiples of 32); no weight decay on parameters named ``bn``;
channels-last; AMP (float16) on GPU; QUASI_RANDOM order on one process, RANDOM under
``training.distributed``; per-epoch JSON log lines in ``logging.folder/log``.

Distributed, as the reference: ``--training.distributed=1 --dist.world_size=N`` spawns
one process per GPU (``torch.multiprocessing.spawn``; NCCL on GPUs, gloo on CPU),
FFCV's ``distributed=True`` loaders, DDP, and ``SelectiveLoader``'s step agreement.
Across machines, launch with ``torchrun`` instead (``--training.distributed=1``; it sets
RANK, WORLD_SIZE and LOCAL_RANK, the rendezvous is ``env://``, ``dist.world_size`` is
taken from it); every rank reads the same ``.beton`` paths and seed. Sampler mode under
DDP: every rank draws the same plan and loads its shard, the stores merged at each
epoch's end. ``training.batch_size`` is per process. The LR is ``lr.lr`` scaled linearly by the
global batch over ``lr.lr_batch_size`` (the global batch the configs' LR was tuned
at: rn18 1 x 1024, rn50 8 x 512), so one process running an rn50 config gets 1/8 of
the LR per sample... that is, the reference's LR per sample.
The ``selection`` section picks the mode, the strategy (``full`` for plain
training), the fraction, rebatching and the start/end window. ``selection.mode=batch``
selects within each loaded batch (``SelectiveLoader``); ``selection.mode=sampler``
chooses per epoch which images to load at all, from the losses the training step
stored in earlier epochs (``SelectiveSampler``, with ``max_staleness`` and ``anneal``).

LR schedule: set every iteration from training progress in epochs, so it is
unchanged when selection changes the number of optimiser steps per epoch. Per
batch, progress = epoch + FFCV batches consumed before the step / FFCV batches per
epoch; in sampler mode, epoch + steps / this epoch's ``len()`` (read afresh each epoch).

The ``.beton`` files need an ``index`` field: write them with
``sbsampler.ffcv.write_beton`` (or add ``IntField()`` named ``index`` holding the
sample's index to FFCV's ``write_imagenet.py``). Models come from
``torchvision.models`` where it imports, else ``examples/resnets.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from fastargs import Param, Section, get_current_config
from fastargs.validation import OneOf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from ffcv_common import (  # noqa: E402
    SAMPLER_STRATEGIES, cyclic_epoch_lr, evaluate, image_pipeline, label_pipeline, reference_lr,
    reference_param_groups, score_sampler, selective_loader, step_epoch_lr, train_epoch,
)
from resnets import apply_blurpool, resnet  # noqa: E402

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
    lr_batch_size=Param(int, "global batch size lr.lr is for (linear scaling to the run's; 0: none)", default=0),
)
Section("logging", "logging").params(
    folder=Param(str, "where to write the per-epoch log lines and log.json", default="/tmp/sbsampler_imagenet"),
    log_level=Param(int, "0: evaluate at the end only; 1: after every epoch too", default=1),
)
Section("dist", "distributed training (training.distributed=1)").params(
    world_size=Param(int, "number of processes (GPUs)", default=1),
    address=Param(str, "address of rank 0", default="localhost"),
    port=Param(str, "port of rank 0", default="12355"),
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
    use_blurpool=Param(int, "blur before strided convolutions (1/0)", default=0),
    distributed=Param(int, "one process per GPU with DDP (1/0)", default=0),
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
    lookahead=Param(int, "batch mode: steps prepared ahead of the training step, in a thread on a side stream "
                         "(0: in series; one process only)", default=0),
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


def global_batch(cfg) -> int:
    """Samples per optimiser step over every process (before selection)."""
    return cfg["training.batch_size"] * (cfg["dist.world_size"] if cfg["training.distributed"] else 1)


def peak_lr(cfg) -> float:
    """``lr.lr`` scaled linearly to this run's global batch (``lr.lr_batch_size``; unscaled when 0)."""
    ref = cfg["lr.lr_batch_size"]
    return cfg["lr.lr"] * (global_batch(cfg) / ref if ref else 1.0)


def lr_schedule(cfg):
    """``progress -> LR``: ffcv-imagenet's per-iteration rule (``ffcv_common.reference_lr``) at ``peak_lr``."""
    lr, epochs = peak_lr(cfg), cfg["training.epochs"]
    if cfg["lr.lr_schedule_type"] == "cyclic":
        def epoch_lr(e): return cyclic_epoch_lr(e, lr, epochs, cfg["lr.lr_peak_epoch"])
    else:
        def epoch_lr(e): return step_epoch_lr(e, lr, epochs, cfg["lr.step_ratio"], cfg["lr.step_length"])
    return lambda progress: reference_lr(progress, epoch_lr)


def make_loaders(cfg, device: torch.device, sampler: Optional[sb.SelectiveSampler] = None):
    """Train loader (the reference's order, or ``sampler``'s plan), val loader, and the train decoder (for resizing)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    distributed = bool(cfg["training.distributed"])
    res = resolution_at(0, cfg)
    decoder = RandomResizedCropRGBImageDecoder((res, res))
    order = OrderOption.RANDOM if distributed else OrderOption.QUASI_RANDOM  # the reference's
    train = Loader(
        cfg["data.train_dataset"], batch_size=cfg["training.batch_size"], num_workers=cfg["data.num_workers"],
        order=order if sampler is None else sb.ffcv.selective_order(sampler),
        os_cache=bool(cfg["data.in_memory"]), drop_last=True, seed=cfg["training.seed"], distributed=distributed,
        pipelines={
            "image": image_pipeline([decoder, RandomHorizontalFlip()], device, IMAGENET_MEAN, IMAGENET_STD),
            "label": label_pipeline(device),
            "index": label_pipeline(),
        })
    vres = cfg["validation.resolution"]
    val = Loader(
        cfg["data.val_dataset"], batch_size=cfg["validation.batch_size"], num_workers=cfg["data.num_workers"],
        order=OrderOption.SEQUENTIAL, drop_last=False, distributed=distributed,
        pipelines={
            "image": image_pipeline([CenterCropRGBImageDecoder((vres, vres), ratio=CROP_RATIO)], device,
                                    IMAGENET_MEAN, IMAGENET_STD),
            "label": label_pipeline(device),
            "index": None,
        })
    return train, val, decoder


def parse_config():
    """``--section.name=value`` / ``--config-file`` (fastargs); exits naming the data flags if a .beton is missing."""
    cfg = get_current_config()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    cfg.augment_argparse(parser)
    cfg.collect_argparse_args(parser)
    cfg.validate(mode="stderr")
    return cfg


def main() -> Optional[dict]:
    """Check the data, then train on one process or spawn one per GPU (``training.distributed``)."""
    cfg = parse_config()
    for key in ("data.train_dataset", "data.val_dataset"):
        if not cfg[key] or not Path(cfg[key]).is_file():
            print(f"--{key} is {cfg[key]!r}: not a file.\n"
                  "ImageNet .beton files go there: write train and val with sbsampler.ffcv.write_beton(dataset, path)\n"
                  "(or FFCV's write_imagenet.py plus an IntField named 'index'), then pass\n"
                  "  --data.train_dataset=/path/to/train.beton --data.val_dataset=/path/to/val.beton")
            raise SystemExit(2)
    if not cfg["training.distributed"]:
        return train(0, cfg)
    if _torchrun():  # one process per GPU already, on every machine: this one is rank $RANK
        cfg.collect({"dist.world_size": int(os.environ["WORLD_SIZE"])})
        return train(int(os.environ["RANK"]), cfg)
    torch.multiprocessing.spawn(_spawned, nprocs=cfg["dist.world_size"], join=True)
    return None


def _torchrun() -> bool:
    """Whether ``torchrun`` (``torch.distributed.run``) started this process: it sets RANK, WORLD_SIZE, LOCAL_RANK."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _spawned(rank: int) -> None:
    """A spawned process: parse the same command line (``sys.argv`` travels with spawn), train as ``rank``."""
    train(rank, parse_config())


def _params_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter's bytes: equal on every DDP rank when they stayed in step."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def train(rank: int, cfg) -> dict:
    """Train and evaluate as process ``rank`` (0 on one process); rank 0 writes the logs."""
    distributed = bool(cfg["training.distributed"])
    world = cfg["dist.world_size"] if distributed else 1
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"]) if _torchrun() else rank  # this machine's GPU
    if distributed:
        if _torchrun():  # env:// rendezvous: torchrun set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = cfg["dist.address"], cfg["dist.port"]
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        if cuda:
            torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    torch.manual_seed(cfg["training.seed"])  # the same initial weights on every rank (DDP broadcasts rank 0's too)
    amp_dtype = torch.float16 if device.type == "cuda" else None
    model, model_name = resnet(cfg["model.arch"], num_classes=cfg["data.num_classes"])
    blurred = apply_blurpool(model) if cfg["training.use_blurpool"] else 0
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(reference_param_groups(model, cfg["training.weight_decay"]), lr=peak_lr(cfg),
                          momentum=cfg["training.momentum"])
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
    epochs = cfg["training.epochs"]
    store = sampler = None
    if cfg["selection.mode"] == "sampler":
        store, sampler = score_sampler(cfg["data.train_dataset"], cfg["selection.strategy"], cfg["selection.fraction"],
                                       cfg["selection.max_staleness"], cfg["selection.anneal"], epochs,
                                       cfg["training.seed"], num_replicas=world, rank=rank)
    train_loader, val, decoder = make_loaders(cfg, device, sampler)
    if sampler is not None:
        loader = sb.WeightedBatches(train_loader, sampler)
    else:  # SelectiveLoader agrees on the steps with the other ranks (torch.distributed is up)
        loader = selective_loader(train_loader, model, cfg["selection.strategy"], cfg["selection.fraction"],
                                  bool(cfg["selection.rebatch"]), cfg["selection.start"], cfg["selection.end"],
                                  epochs, cfg["training.label_smoothing"], amp_dtype, cfg["training.seed"],
                                  cfg["selection.lookahead"])
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    lr_at = lr_schedule(cfg)
    folder = Path(cfg["logging.folder"])
    lead = rank == 0
    if lead:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "log").write_text("")
        print(f"model {model_name} ({blurred} BlurPool convolutions) on {device} x {world}; "
              f"global batch {global_batch(cfg)}, peak LR {peak_lr(cfg):.4g}; selection {loader!r}")
    flip = bool(cfg["validation.lr_tta"])
    started = time.time()

    def evaluate_all() -> dict:
        t0 = time.time()
        stats = evaluate(model, val, amp_dtype, channels_last=True, flip_tta=flip)
        if distributed:  # every rank saw its shard: sum the counts
            counts = torch.tensor([stats["top_1"] * stats["n"], stats["top_5"] * stats["n"], stats["n"]],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            stats = {"top_1": float(counts[0] / counts[2]), "top_5": float(counts[1] / counts[2]),
                     "n": int(counts[2])}
        return {**stats, "val_time": time.time() - t0}

    def log_line(content: dict) -> None:
        if lead:
            now = time.time()
            with open(folder / "log", "a") as fd:
                fd.write(json.dumps({"timestamp": now, "relative_time": now - started, **content}) + "\n")

    log, last = [], {}
    for epoch in range(epochs):
        res = resolution_at(epoch, cfg)
        decoder.output_size = (res, res)
        row = train_epoch(model, loader, opt, lr_at, epoch, cfg["training.label_smoothing"], scaler, amp_dtype,
                          channels_last=True, max_steps=cfg["training.max_steps"] or None, store=store,
                          lr_before_step=True)
        row["resolution"] = res
        if store is not None and distributed:  # every rank's scores in every rank's store: the same next plan
            store.merge(sb.distributed.RankSync())
        log.append(row)
        if lead:
            print(json.dumps(row))
        if cfg["logging.log_level"] > 0 and epoch < epochs - 1:
            last = evaluate_all()
            log_line(_epoch_line(row, last, opt, loader, sampler))
    last = evaluate_all()
    log_line(_epoch_line(log[-1], last, opt, loader, sampler) if log else {"epoch": None, **last})
    backprop = sum(row["samples_backprop"] for row in log)
    loaded = loader.stats.samples_seen if sampler is None else backprop
    steps = [row["steps"] for row in log]
    if distributed:
        (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "steps": steps,
                                                             "params_sha1": _params_digest(model)}))
    result = {"model": model_name, "device": str(device), "world_size": world, "mode": cfg["selection.mode"],
              "blurpool_convs": blurred, "peak_lr": peak_lr(cfg), **{k: last[k] for k in ("top_1", "top_5")},
              "epochs": log, "samples_loaded": loaded, "samples_backprop": backprop,
              "loader_stats": loader.stats.as_dict() if sampler is None else None}
    if lead:
        (folder / "log.json").write_text(json.dumps(result, indent=2))
        print(f"top_1 {last['top_1']:.4f} top_5 {last['top_5']:.4f}; "
              f"loaded {loaded} samples, back-propagated {backprop} (rank 0); log in {folder / 'log'}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _epoch_line(row: dict, val: dict, opt, loader, sampler) -> dict:
    """The reference's log fields (epoch, top-1/top-5, train loss, LR, times) and what selection did."""
    line = {"epoch": row["epoch"], "current_lr": opt.param_groups[0]["lr"], "top_1": val["top_1"],
            "top_5": val["top_5"], "val_time": val["val_time"], "train_loss": row["loss"],
            "epoch_time": row["seconds"], "steps": row["steps"], "samples_backprop": row["samples_backprop"]}
    if sampler is None:
        stats = loader.stats
        line.update(samples_loaded=stats.samples_seen, samples_backprop_total=stats.samples_yielded,
                    time_scoring=stats.time_scoring, selection_time=stats.selection_time)
    else:
        line.update(samples_loaded=row["samples_backprop"])
    return line


if __name__ == "__main__":
    main()
