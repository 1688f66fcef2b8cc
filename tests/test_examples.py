"""The FFCV examples run end to end on CPU on tiny generated .beton files (smoke configurations)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("SBSAMPLER_REQUIRE_FFCV") != "1":
    pytest.importorskip("ffcv")

ROOT = Path(__file__).resolve().parent.parent


#: multi-process, example or benchmark runs: `python -m pytest -q -m slow` (CI runs it)
pytestmark = pytest.mark.slow


def run(args, cwd=ROOT, timeout=400):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_betons(tmp_path_factory):
    from sbsampler.ffcv import write_beton

    folder = tmp_path_factory.mktemp("tiny_imagenet")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (256, 3, 64, 64), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (256,), generator=g)
    train = write_beton([(imgs[i], int(labels[i])) for i in range(256)], folder / "train.beton")
    val = write_beton([(imgs[i], int(labels[i])) for i in range(64)], folder / "val.beton")
    return train, val, folder


def run_imagenet(tiny_betons, log_dir, *overrides):
    """The ImageNet example on the tiny .betons at 32x32, 10 classes, with ``overrides``."""
    train, val, _ = tiny_betons
    return run([
        "examples/ffcv_imagenet/train_imagenet.py", "-C", "examples/ffcv_imagenet/rn18_configs/rn18_16_epochs.yaml",
        f"--data.train_dataset={train}", f"--data.val_dataset={val}", "--data.num_workers=2",
        "--data.num_classes=10", "--resolution.min_res=32", "--resolution.max_res=32",
        "--validation.resolution=32", "--validation.batch_size=64", f"--logging.folder={log_dir}", *overrides,
    ])


def test_imagenet_example_smoke(tiny_betons):
    folder = tiny_betons[2]
    res = run_imagenet(tiny_betons, folder / "log", "--training.batch_size=128", "--training.epochs=1",
                       "--selection.strategy=gradmatch", "--selection.rebatch=1", "--lr.lr_peak_epoch=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((folder / "log" / "log.json").read_text())
    stats = log["loader_stats"]
    assert stats["samples_seen"] == 256 and stats["batches_seen"] == 2
    assert stats["samples_selected"] == 64 == stats["samples_yielded"]  # rebatched into one step of 64
    assert log["epochs"][0]["steps"] == 1
    # The LR follows the wrapped loader's batches, set before each step as ffcv-imagenet does: the one
    # rebatched step starts at progress 0, so it runs at the cyclic schedule's start, 1e-4 of the peak;
    # the peak is lr.lr scaled by the global batch 128 over the config's lr_batch_size 1024.
    assert log["peak_lr"] == pytest.approx(0.5 * 128 / 1024)
    assert log["epochs"][0]["lr_first_step"] == pytest.approx(1e-4 * 0.5 * 128 / 1024)
    assert log["blurpool_convs"] == 6  # ResNet-18: the 3 strided 3x3 convolutions past the stem, 3 shortcuts
    assert 0.0 <= log["top_1"] <= log["top_5"] <= 1.0
    lines = [json.loads(line) for line in (folder / "log" / "log").read_text().splitlines()]
    assert len(lines) == 1  # the rn18 configs' log_level 0: evaluated at the end only, as the reference
    assert {"epoch", "top_1", "top_5", "train_loss", "current_lr", "epoch_time", "val_time", "samples_loaded",
            "samples_backprop", "selection_time", "relative_time"} <= set(lines[0])


def _reference_lr(e, ix, iters, lr, epochs, peak):
    """ffcv-imagenet: np.interp(ix, [0, iters], [get_cyclic_lr(e), get_cyclic_lr(e + 1)])."""
    def epoch_lr(x):
        return float(np.interp(x, [0, peak, epochs], [1e-4 * lr, lr, 0]))
    return float(np.interp(ix, [0, iters], [epoch_lr(e), epoch_lr(e + 1)]))


def test_imagenet_example_sampler_mode_keeps_the_lr_schedule(tiny_betons):
    """Sampler mode: epoch 0 loads all 256 images, later epochs the planned quarter; every
    epoch's LR runs over that epoch's own length, so the schedule still ends at 0 on the last
    step (a length frozen at epoch 0's 8 batches would stop epoch 2 at progress 2.25)."""
    log_dir = tiny_betons[2] / "log_sampler"
    res = run_imagenet(tiny_betons, log_dir, "--training.batch_size=32", "--training.epochs=3",
                       "--selection.mode=sampler", "--selection.strategy=uniform", "--selection.fraction=0.25",
                       "--lr.lr=0.1", "--lr.lr_peak_epoch=1", "--lr.lr_batch_size=32")
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((log_dir / "log.json").read_text())
    epochs = log["epochs"]
    assert [e["steps"] for e in epochs] == [8, 2, 2] == [e["batches_per_epoch"] for e in epochs]
    assert [e["samples_backprop"] for e in epochs] == [256, 64, 64]
    assert log["samples_loaded"] == log["samples_backprop"] == 384
    for e in epochs:
        k, n = e["epoch"], e["steps"]
        assert e["lr_first_step"] == pytest.approx(_reference_lr(k, 0, n, 0.1, 3, 1))
        assert e["lr_last_step"] == pytest.approx(_reference_lr(k, n - 1, n, 0.1, 3, 1))
    assert epochs[-1]["lr_last_step"] == pytest.approx(0.025)  # epoch 2 runs from 0.05 toward 0: its 2nd of 2 steps


def test_imagenet_example_distributed_keeps_ranks_in_step(tiny_betons):
    """Two gloo processes (the reference's spawn), FFCV distributed loaders, a variable-count strategy:
    every rank takes the same steps and ends with the same parameters."""
    log_dir = tiny_betons[2] / "log_ddp"
    res = run_imagenet(tiny_betons, log_dir, "--training.batch_size=32", "--training.epochs=2",
                       "--training.distributed=1", "--dist.world_size=2", "--dist.port=29541",
                       "--data.num_workers=1", "--validation.batch_size=32", "--selection.strategy=infobatch")
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [4, 4]  # 128 images a rank, 32 a batch
    assert ranks[0]["params_sha1"] == ranks[1]["params_sha1"]
    log = json.loads((log_dir / "log.json").read_text())
    assert log["world_size"] == 2 and log["peak_lr"] == pytest.approx(0.5 * 64 / 1024)  # the global batch, 2 x 32
    assert log["loader_stats"]["samples_seen"] == 2 * 128


def test_imagenet_example_sampler_mode_under_ddp(tiny_betons):
    """Sampler-level selection across 2 gloo processes (issue 24): every rank merges its store with the other's at
    each epoch's end, draws the same plan and loads its half of it: equal steps, identical parameters."""
    log_dir = tiny_betons[2] / "log_ddp_sampler"
    res = run_imagenet(tiny_betons, log_dir, "--training.batch_size=16", "--training.epochs=3",
                       "--training.distributed=1", "--dist.world_size=2", "--dist.port=29543",
                       "--data.num_workers=1", "--validation.batch_size=32", "--selection.mode=sampler",
                       "--selection.strategy=uniform", "--selection.fraction=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(2)]
    # epoch 0 loads everything (nothing scored yet): 128 a rank, 8 batches of 16; then half of it
    assert ranks[0]["steps"] == ranks[1]["steps"] == [8, 4, 4]
    assert ranks[0]["params_sha1"] == ranks[1]["params_sha1"]


def torchrun_imagenet(tiny_betons, log_dir, nproc, res, *overrides):
    """The ImageNet example launched by torchrun (env:// rendezvous) on the tiny .betons, ``nproc`` processes."""
    train, val, _ = tiny_betons
    return subprocess.run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "examples/ffcv_imagenet/train_imagenet.py", "-C", "examples/ffcv_imagenet/rn18_configs/rn18_16_epochs.yaml",
        f"--data.train_dataset={train}", f"--data.val_dataset={val}", "--data.num_classes=10",
        f"--resolution.min_res={res}", f"--resolution.max_res={res}", f"--validation.resolution={res}",
        f"--logging.folder={log_dir}", "--training.epochs=1", "--training.distributed=1", *overrides],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=400)


def test_imagenet_example_under_torchrun(tiny_betons):
    """Launched by torchrun (2 CPU processes standing for 2 machines' ranks): the example trains each rank once, in
    step (issue 24)."""
    log_dir = tiny_betons[2] / "log_torchrun"
    res = torchrun_imagenet(tiny_betons, log_dir, 2, 32, "--data.num_workers=1", "--validation.batch_size=32",
                            "--training.batch_size=32", "--selection.strategy=sb")
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [4]
    assert ranks[0]["params_sha1"] == ranks[1]["params_sha1"]
    assert json.loads((log_dir / "log.json").read_text())["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_imagenet_example_ddp_path_on_one_gpu(tiny_betons):
    """The example's distributed path on a GPU: torchrun, NCCL, world size 1, ToDevice, float16 AMP (issue 24)."""
    log_dir = tiny_betons[2] / "log_one_gpu"
    res = torchrun_imagenet(tiny_betons, log_dir, 1, 64, "--data.num_workers=2", "--validation.batch_size=64",
                            "--training.batch_size=64", "--selection.strategy=gradmatch")
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((log_dir / "log.json").read_text())
    assert log["world_size"] == 1 and log["device"].startswith("cuda") and log["epochs"][0]["steps"] == 4


def test_sampler_mode_refuses_strategies_that_need_current_gradients():
    res = run(["examples/cifar_ffcv.py", "--synthetic", "64", "--mode", "sampler", "--strategy", "gradmatch"])
    assert res.returncode != 0 and "--mode batch" in res.stderr


def test_imagenet_example_says_where_the_data_goes():
    res = run(["examples/ffcv_imagenet/train_imagenet.py", "--data.train_dataset=/nonexistent/train.beton"])
    assert res.returncode == 2
    assert "--data.train_dataset=/path/to/train.beton" in res.stdout


def test_cifar_example_smoke():
    res = run(["examples/cifar_ffcv.py", "--synthetic", "256", "--epochs", "1", "--batch-size", "64",
               "--strategy", "sb", "--fraction", "0.25", "--lr-peak-epoch", "0.5"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "top_1" in res.stdout and "back-propagated 64 of 256 samples" in res.stdout


def test_cifar_example_sampler_mode_with_infobatch_and_anneal():
    res = run(["examples/cifar_ffcv.py", "--synthetic", "128", "--epochs", "3", "--batch-size", "32",
               "--mode", "sampler", "--strategy", "infobatch", "--anneal", "0.25", "--lr-peak-epoch", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    steps = [r["steps"] for r in rows]
    assert steps[0] == 4 and steps[1] < 4 and steps[2] == 4  # full, pruned, annealed to full
    assert all(r["steps"] == r["batches_per_epoch"] for r in rows)
    assert rows[-1]["lr_last_step"] == 0.0
