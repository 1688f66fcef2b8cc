"""Training-loop pieces shared by the FFCV examples (ImageNet and CIFAR).

Two ways to select, both feeding ``train_epoch``:

- per batch (``--mode batch``): ``SelectiveLoader`` loads and scores every sample,
  then back-propagates a weighted subset of each batch;
- per epoch from stored scores (``--mode sampler``): a ``SelectiveSampler`` picks
  which samples the FFCV loader loads at all (``sb.ffcv.selective_order``), from
  the losses the training step itself wrote into a ``ScoreStore`` in earlier
  epochs; the first epoch loads everything, later ones fewer.

The learning rate is a function of training progress measured in epochs, set at
every step, so a schedule written per epoch stays correct however many steps an
epoch has:

- per batch: ``SelectiveLoader.progress``, ``epoch + batches consumed / batches
  per epoch`` of the FFCV loader it wraps, with or without rebatching;
- sampler: ``WeightedBatches.progress``, ``epoch + steps / len()`` with ``len()``
  that of *each* epoch's plan, never frozen at the first epoch's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import sbsampler as sb

__all__ = ["cyclic_lr", "reference_lr", "cyclic_epoch_lr", "step_epoch_lr", "reference_param_groups",
           "image_pipeline", "label_pipeline", "rule_fraction", "selective_loader", "score_sampler",
           "train_epoch", "evaluate", "param_groups", "SAMPLER_STRATEGIES"]

#: strategies that can choose from the losses the training step stored (no gradient norms, no current gradients)
SAMPLER_STRATEGIES = tuple(name for name, cls in sb.STRATEGIES.items()
                           if cls.works_from_stored and not cls.needs_gradients and not cls.keeps_all)


def image_pipeline(ops: list, device: torch.device, mean: np.ndarray, std: np.ndarray) -> list:
    """Decoder/augmentation ``ops``, then a normalised CHW tensor on ``device``.

    On GPU, FFCV's order: ToTensor, ToDevice, ToTorchImage, NormalizeImage (float16, on the GPU).
    On CPU, NormalizeImage is a Numba op and must come before ToTensor: FFCV 1.0.2's
    ``Graph.group_operations`` never ends for a pipeline that returns to Numba after a torch op.
    """
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    if device.type == "cuda":
        return [*ops, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                NormalizeImage(mean, std, np.float16)]
    return [*ops, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]


def label_pipeline(device: Optional[torch.device] = None) -> list:
    """Integer field as a (B,) int64 tensor, moved to ``device`` when it is a GPU (indices stay on the CPU)."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    to_dev = [ToDevice(device, non_blocking=True)] if device is not None and device.type == "cuda" else []
    return [IntDecoder(), ToTensor(), Squeeze(), *to_dev]


def cyclic_lr(progress: float, lr: float, epochs: int, peak_epoch: float) -> float:
    """FFCV's triangular schedule: ``1e-4 lr`` -> ``lr`` at ``peak_epoch`` -> 0 at ``epochs``."""
    return lr * sb.schedule.one_cycle(epochs, peak_epoch)(progress)


def cyclic_epoch_lr(epoch: int, lr: float, epochs: int, peak_epoch: float) -> float:
    """ffcv-imagenet's ``get_cyclic_lr``: ``np.interp(epoch, [0, peak, epochs], [1e-4 lr, lr, 0])``."""
    return float(np.interp(epoch, [0, peak_epoch, epochs], [1e-4 * lr, lr, 0.0]))


def step_epoch_lr(epoch: int, lr: float, epochs: int, step_ratio: float, step_length: int) -> float:
    """ffcv-imagenet's ``get_step_lr``: ``lr * step_ratio ** (epoch // step_length)``, 0 from ``epochs`` on."""
    if epoch >= epochs:
        return 0.0
    return lr * step_ratio ** (epoch // step_length)


def reference_lr(progress: float, epoch_lr: Callable[[int], float]) -> float:
    """ffcv-imagenet's per-iteration LR at ``progress = e + ix / iters`` (before iteration ``ix`` of epoch ``e``).

    The reference sets ``np.interp(ix, [0, iters], [epoch_lr(e), epoch_lr(e + 1)])``:
    a straight line through each epoch from its value toward the next epoch's (for the
    step schedule a ramp into each drop, not a jump).
    """
    e = int(np.floor(progress))
    frac = progress - e
    return float((1.0 - frac) * epoch_lr(e) + frac * epoch_lr(e + 1))


def reference_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """ffcv-imagenet's rule: no weight decay on parameters whose name contains ``"bn"``.

    With torchvision's ResNets that leaves decay on the shortcut BatchNorms
    (``downsample.1``), as in the reference; ``examples/resnets.py`` names its layers alike.
    """
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "bn" in n], "weight_decay": 0.0},
            {"params": [p for n, p in named if "bn" not in n], "weight_decay": weight_decay}]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm parameters (as in FFCV's ImageNet example)."""
    bn, other = [], []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        (bn if isinstance(module, nn.modules.batchnorm._BatchNorm) else other).extend(params)
    return [{"params": bn, "weight_decay": 0.0}, {"params": other, "weight_decay": weight_decay}]


def rule_fraction(strategy: str, fraction: Optional[float]) -> Optional[float]:
    """The fraction to hand the library: ``None``, said once, for a rule that chooses its own count (InfoBatch,
    full training), which refuses one; a configuration file carries one fraction for every rule."""
    used = sb.strategies.fraction_for(strategy, fraction)
    if used is None and fraction is not None:
        print(f"note: {strategy} chooses its own count, so the fraction {fraction:g} is not used (the share it kept "
              "is in the log)")
    return used


def selective_loader(ffcv_loader, model: nn.Module, strategy: str, fraction: float, rebatch: bool,
                     start: float, end: float, epochs: int, label_smoothing: float,
                     amp_dtype: Optional[torch.dtype], seed: int, lookahead: int = 0) -> sb.SelectiveLoader:
    """Wrap an FFCV loader; ``strategy="full"`` passes every batch through (no scoring); ``lookahead``: steps
    prepared ahead of the training step (``sbsampler.lookahead``)."""
    hook = sb.ScoringHook(model, label_smoothing=label_smoothing, amp_dtype=amp_dtype)
    return sb.SelectiveLoader(ffcv_loader, hook, strategy=strategy, fraction=rule_fraction(strategy, fraction),
                              rebatch=rebatch, start=start, end=end, epochs=epochs, seed=seed, lookahead=lookahead)


def score_sampler(beton: Union[str, Path], strategy: str, fraction: float, max_staleness: Optional[int],
                  anneal: float, epochs: int, seed: int, num_replicas: int = 1,
                  rank: int = 0) -> tuple[sb.ScoreStore, sb.SelectiveSampler]:
    """A ``ScoreStore`` over the samples of the ``beton`` file and the ``SelectiveSampler`` that plans from it.

    Under DDP (``num_replicas`` ranks) every rank draws the same plan from its own store and loads its
    shard of it: merge the stores at each epoch's end (``store.merge(RankSync())``) so they stay equal.

    Only strategies that work from stored losses: ``SAMPLER_STRATEGIES``. (ImportanceSampling
    also needs gradient norms, which the training step here does not compute, and
    GradientMatching needs the current gradients: select those per batch.)
    """
    if strategy not in SAMPLER_STRATEGIES:
        raise SystemExit(f"--mode sampler chooses from stored losses: strategy must be one of "
                         f"{', '.join(SAMPLER_STRATEGIES)}, got {strategy!r} (use --mode batch for it)")
    from ffcv.reader import Reader

    store = sb.ScoreStore(Reader(str(beton)).num_samples)
    sampler = sb.SelectiveSampler(store, strategy, fraction=rule_fraction(strategy, fraction),
                                  max_staleness=max_staleness or None,
                                  anneal=anneal, epochs=epochs, seed=seed, num_replicas=num_replicas, rank=rank)
    return store, sampler


def train_epoch(model: nn.Module, loader: Union[sb.SelectiveLoader, sb.WeightedBatches], opt: torch.optim.Optimizer,
                lr_at: Callable[[float], float], epoch: int, label_smoothing: float,
                scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                channels_last: bool = False, max_steps: Optional[int] = None,
                store: Optional[sb.ScoreStore] = None, lr_before_step: bool = False) -> dict:
    """One epoch of weighted sub-batch steps; returns loss, steps, samples, LRs and time.

    ``loader`` is a ``SelectiveLoader`` (per-batch selection) or ``WeightedBatches``
    over a ``SelectiveSampler`` (sampler mode). ``store``: record each sample's
    training loss there (sampler mode: the next epoch's plan is drawn from it).
    ``lr_before_step``: the LR at the progress before the step's batches (ffcv-imagenet's
    ``e + ix / iters``), else after them (``e + (ix + 1) / iters``).
    """
    model.train()
    per_epoch = len(loader.loader) if isinstance(loader, sb.SelectiveLoader) else len(loader)
    steps, samples, total, lr = 0, 0, 0.0, lr_at(epoch)
    lr_first = None
    t0 = time.perf_counter()
    before = float(epoch)  # progress before this step's batches
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=None, leave=False)
    for batch in bar:
        after = loader.progress  # epochs done, this step's batches included (sbsampler.schedule)
        lr = lr_at(before if lr_before_step else after)
        before = after
        lr_first = lr if lr_first is None else lr_first
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch.inputs
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(device_type=x.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            out = model(x)
            per_sample = F.cross_entropy(out, batch.targets, reduction="none", label_smoothing=label_smoothing)
            loss = sb.weighted_loss(per_sample.float(), batch.weights)
        if store is not None:
            store.update(batch.indices, per_sample.detach().float())  # no extra forward
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        steps += 1
        samples += len(batch)
        total += float(loss.detach())
        bar.set_postfix(lr=f"{lr:.3g}", loss=f"{float(loss.detach()):.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    return {"epoch": epoch, "loss": total / max(steps, 1), "steps": steps, "batches_per_epoch": per_epoch,
            "samples_backprop": samples, "seconds": time.perf_counter() - t0, "lr_first_step": lr_first,
            "lr_last_step": lr}


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             flip_tta: bool = False) -> dict:
    """Top-1 / top-5 accuracy over an FFCV loader of ``(images, labels)``."""
    model.eval()
    top1 = top5 = n = 0
    for images, labels in loader:
        labels = labels.reshape(-1)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(device_type=images.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            out = model(images).float()
            if flip_tta:
                out = out + model(torch.flip(images, dims=[3])).float()
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        top1 += int((pred[:, 0] == labels).sum())
        top5 += int((pred == labels[:, None]).any(1).sum())
        n += len(labels)
    return {"top_1": top1 / max(n, 1), "top_5": top5 / max(n, 1), "n": n}
