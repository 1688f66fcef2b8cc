"""Selective backprop inside the HuggingFace Trainer: a tiny ViT (from a config, no download) on
scikit-learn's 8x8 digits (shipped, offline), CPU, well under a minute.

    python examples/hf_trainer_digits.py --strategy sb --fraction 0.25 --epochs 15

``SelectiveTrainer`` replaces ``Trainer``: batches are dicts (``pixel_values``,
``labels``), scored and selected in ``compute_loss``;
gradient accumulation, the LR schedule and ``max_steps`` are the Trainer's own.
Prints one JSON line: test accuracy, samples back-propagated and seen.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from sbsampler.integrations.transformers import SelectiveTrainer

def as_examples(images: np.ndarray, labels: np.ndarray) -> list[dict]:
    pixels = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return [{"pixel_values": p, "labels": torch.tensor(int(y))} for p, y in zip(pixels, labels)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="sb", help="a registered strategy name, or 'full'")
    parser.add_argument("--fraction", type=float, default=None,
                        help="share of each batch to back-propagate (default 0.25; not for infobatch or full)")
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    train = as_examples(d.data[perm[:1437]], d.target[perm[:1437]])
    test = as_examples(d.data[perm[1437:]], d.target[perm[1437:]])
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=32,
                                  gradient_accumulation_steps=args.accumulate, num_train_epochs=args.epochs,
                                  learning_rate=1e-3, warmup_steps=10, lr_scheduler_type="cosine",
                                  report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                                  seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
        trainer = SelectiveTrainer(model=model, args=targs, train_dataset=train, strategy=args.strategy,
                                   fraction=args.fraction, seed=args.seed)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        pred = trainer.predict(test)
    acc = float((pred.predictions.argmax(1) == pred.label_ids).mean())
    stats = trainer.selector.stats
    row = {"strategy": args.strategy, "fraction": trainer.selector.fraction, "epochs": args.epochs,
           "test_acc": round(acc, 4),
           "optimizer_steps": trainer.state.global_step, "samples_backprop": stats.samples_yielded,
           "samples_seen": stats.samples_seen, "train_s": round(seconds, 2)}
    estimate = stats.saving_estimate()  # the time saved against training on everything, as the stats estimate it
    row["estimated_saved_s"] = None if estimate is None else {"low": estimate.low, "high": estimate.high,
                                                              "point": estimate.point, "basis": estimate.basis}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
