"""The GPU paths: the hook, the loader, the sampler and AMP scoring on CUDA against the CPU.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.strategies import fraction_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL = sorted(sb.strategies.STRATEGIES)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def data(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_hook_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = data(128)
    cpu = sb.ScoringHook(model).score(x, y)
    model_gpu = SmallCNN().cuda()
    model_gpu.load_state_dict(model.state_dict())
    gpu = sb.ScoringHook(model_gpu).score(x.cuda(), y.cuda())
    assert gpu.loss.device.type == "cuda"
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(gpu.grad_norms()).cpu().float(),
                               torch.as_tensor(cpu.grad_norms()).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(gpu.gram()).cpu().double(),
                               torch.as_tensor(cpu.gram()).double(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_scoring_close_to_fp32(dtype):
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    x, y = (t.cuda() for t in data(256))
    ref = sb.ScoringHook(model).score(x, y)
    amp = sb.ScoringHook(model, amp_dtype=dtype).score(x, y)
    assert amp.loss.dtype == torch.float32 or amp.loss.dtype == ref.loss.dtype
    assert torch.isfinite(amp.loss).all()
    torch.testing.assert_close(amp.loss.float(), ref.loss.float(), rtol=5e-2, atol=5e-2)
    # the selection it drives agrees with fp32 scoring on most of the picked set
    k = 64
    top_ref = set(torch.topk(ref.loss, k).indices.tolist())
    top_amp = set(torch.topk(amp.loss.float(), k).indices.tolist())
    assert len(top_ref & top_amp) >= 0.8 * k


@pytest.mark.parametrize("strategy", ALL)
def test_loader_on_cuda_every_strategy(strategy):
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    x, y = data(512)
    dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    hook = sb.ScoringHook(model)
    loader = sb.SelectiveLoader(dl, hook, strategy=strategy,
                                fraction=fraction_for(strategy, 0.25), device="cuda", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = 0
    for b in loader:
        assert b.inputs.device.type == "cuda" and b.targets.device.type == "cuda"
        assert b.weights.device.type == "cuda" and b.indices is not None
        loss = (F.cross_entropy(model(b.inputs), b.targets, reduction="none") * b.weights).sum()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += len(b.targets)
    assert rows == loader.stats.samples_yielded > 0


def test_uniform_picks_same_rows_on_cuda_and_cpu():
    """Uniform does not read the scores: the same seed picks the same rows on either device."""
    x, y = data(256)
    picks = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = SmallCNN().to(dev)
        dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
        loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), strategy="uniform", fraction=0.25, device=dev, seed=3)
        picks[dev] = [b.indices.cpu().numpy() for b in loader]
    for a, b in zip(picks["cpu"], picks["cuda"]):
        np.testing.assert_array_equal(a, b)


def test_sampler_with_cuda_losses():
    """A store fed the step's CUDA losses plans the next epoch; batches reach the GPU with their weights."""
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    x, y = data(256)
    ds = sb.with_indices(TensorDataset(x, y))
    store = sb.ScoreStore(len(x))
    sampler = sb.SelectiveSampler(store, "sb", fraction=0.5, seed=0)
    batches = sb.WeightedBatches(DataLoader(ds, batch_size=32, sampler=sampler), sampler)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        n = 0
        for b in batches:
            xb, yb, w = b.inputs.cuda(), b.targets.cuda(), b.weights.cuda()
            loss = F.cross_entropy(model(xb), yb, reduction="none")
            store.update(b.indices, loss.detach())
            sb.weighted_loss(loss, w).backward()
            n += len(yb)
        seen.append(n)
    assert seen[0] == 256 and seen[1] == len(sampler.plan(1)[0]) < 256


def test_per_token_sketch_on_cuda():
    torch.manual_seed(0)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    def token_loss(logits, targets):
        per = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        mask = (targets != -100).float()
        return (per * mask).sum(1) / mask.sum(1).clamp_min(1)

    model = Tok()
    ids = torch.randint(0, 50, (16, 12))
    cpu = sb.ScoringHook(model, loss=token_loss, exact_limit=1, sketch_dim=8, seed=0).score(ids, ids)
    model_gpu = Tok().cuda()
    model_gpu.load_state_dict(model.state_dict())
    exact_gpu = sb.ScoringHook(model_gpu, loss=token_loss).score(ids.cuda(), ids.cuda())
    exact_cpu = sb.ScoringHook(model, loss=token_loss).score(ids, ids)
    torch.testing.assert_close(torch.as_tensor(exact_gpu.gram()).cpu().double(),
                               torch.as_tensor(exact_cpu.gram()).double(), rtol=1e-3, atol=1e-5)
    assert cpu.grads is not None and cpu.grads.shape == (16, 64)


def test_lightning_callback_on_cuda():
    L = pytest.importorskip("lightning.pytorch")
    from sbsampler.integrations.lightning import SelectiveBackpropCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()
            self.devices = set()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            self.devices.add((batch.inputs.device.type, batch.weights.device.type))
            return sb.weighted_loss(F.cross_entropy(self(batch.inputs), batch.targets, reduction="none"),
                                    batch.weights)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = data(256)
    model, cb = Net(), SelectiveBackpropCallback("gradmatch", fraction=0.25, seed=0, log=False)
    L.Trainer(accelerator="gpu", devices=1, max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False).fit(model, DataLoader(TensorDataset(x, y), batch_size=64))
    assert model.devices == {("cuda", "cuda")}
    assert cb.selector.stats.samples_yielded == 64


def test_selective_trainer_on_cuda(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from sbsampler.integrations.transformers import SelectiveTrainer

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=16, num_labels=3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (64, 10), generator=g)
    ds = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": ids[i, 0] % 3}
          for i in range(64)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=2,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             bf16=True)
    t = SelectiveTrainer(model=model, args=args, train_dataset=ds, strategy="sb", fraction=0.25, seed=0)
    t.train()
    assert next(model.parameters()).device.type == "cuda"
    assert t.selector.stats.samples_yielded == 2 * 16


def test_stats_time_the_scoring_forward_on_cuda():
    """The scoring time is the scoring forward's, not its launch's (CUDA runs ahead of the host clock)."""
    import time

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()) for _ in range(12)],
                          nn.Linear(2048, 10)).cuda()
    x, y = torch.randn(4096, 2048, device="cuda"), torch.randint(0, 10, (4096,), device="cuda")
    # a callable loss: no label check inside the hook waits for the forward (integer labels are checked, a sync)
    hook = sb.ScoringHook(model, loss=lambda z, t: F.cross_entropy(z, t, reduction="none"))
    for _ in range(30):  # warm: an idle GPU clocks down, and its first passes run several times slower
        hook.score(x, y)
    loader = sb.SelectiveLoader([(x, y)] * 5, hook, "topk", fraction=0.25, device="cuda")
    list(loader)
    per_batch = loader.stats.time_scoring / 5
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        hook.score(x, y)
    torch.cuda.synchronize()
    direct = (time.perf_counter() - t0) / 5
    assert per_batch >= 0.7 * direct, (per_batch, direct)
    assert loader.stats.time_selecting < per_batch


def _cuda_batches(n: int = 6, b: int = 64, nan_at=None, label=None):
    """Batches already on the GPU, dataset indices on the host (as a loader gives them)."""
    x, y = data(n * b)
    x, y = x.cuda(), y.cuda()
    if nan_at is not None:
        x[nan_at] = float("nan")
    if label is not None:
        y[label[0]] = label[1]
    return [(x[j * b:(j + 1) * b], y[j * b:(j + 1) * b], torch.arange(j * b, (j + 1) * b)) for j in range(n)]


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sb", "composer", "full"])
@pytest.mark.parametrize("rebatch", [False, True])
def test_selection_on_the_gpu_never_waits_for_it(strategy, rebatch):
    """Issue 15: with ``select_on="auto"`` a GPU batch is scored, selected and gathered with no host sync."""
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    hook = sb.ScoringHook(model)
    loader = sb.SelectiveLoader(_cuda_batches(), hook, strategy,
                                fraction=fraction_for(strategy, 0.25), rebatch=rebatch, seed=0)
    steps = iter(loader)
    first = next(steps)  # the hook compares its head with the logits once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [next(steps) for _ in range(2 if rebatch else 4)]  # short of the epoch's end, which waits on purpose
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for step in [first, *rest]:
        assert step.inputs.is_cuda and step.weights.is_cuda
    assert loader.stats.time_scoring > 0  # the CUDA events are read here, after the loop


def test_gpu_checks_raise_late_but_name_the_batch():
    torch.manual_seed(0)
    hook = sb.ScoringHook(SmallCNN().cuda())
    with pytest.raises(ValueError, match=r"dataset indices \[70\].*found after later batches"):
        list(sb.SelectiveLoader(_cuda_batches(nan_at=70), hook, "sb", seed=0))
    with pytest.raises(ValueError, match=r"target label 12 is out of range.*found after later batches"):
        list(sb.SelectiveLoader(_cuda_batches(label=(200, 12)), hook, "topk", seed=0))


@pytest.mark.parametrize("name,kwargs", [("sb", {"beta": 2.0}), ("composer", {}), ("infobatch", {})])
def test_gpu_selection_follows_the_host_law(name, kwargs):
    from reference import make_scores

    scores = make_scores(seed=3, b=12)
    gpu = sb.Scores(loss=scores.loss.cuda())
    host, dev = sb.STRATEGIES[name](**kwargs, seed=1), sb.STRATEGIES[name](**kwargs, seed=2)
    f_host, f_dev = np.zeros(12), np.zeros(12)
    for _ in range(4000):
        f_host[host.select(scores, 4).indices] += 1
        f_dev[dev.select_tensors(gpu, 4)[0].cpu().numpy()] += 1
    np.testing.assert_allclose(f_dev / 4000, f_host / 4000, atol=0.04)


@pytest.mark.parametrize("rebatch", [False, True])
def test_lookahead_on_a_side_stream_scores_one_version_n_steps_old(rebatch):
    """The look-ahead thread's work goes to a side stream: each batch of step p is still scored by the parameters
    after max(0, p - 1) steps (sbsampler.lookahead), and the steps are those of the same run in series when the
    model does not change."""
    import copy

    torch.manual_seed(0)
    model = SmallCNN().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data(256)
    store = sb.ScoreStore(256)
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=32, pin_memory=True)
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), "sb", fraction=0.25, rebatch=rebatch, batch_size=16,
                                seed=0, device="cuda", store=store, lookahead=1)
    versions = [copy.deepcopy(model.state_dict())]
    for b in loader:
        loss = sb.weighted_loss(F.cross_entropy(model(b.inputs), b.targets, reduction="none"), b.weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        versions.append(copy.deepcopy(model.state_dict()))
    per_step = 2 if rebatch else 1
    fresh = SmallCNN().cuda().eval()
    for j in range(8):
        p = j // per_step
        fresh.load_state_dict(versions[max(0, p - 1)])
        with torch.no_grad():
            want = F.cross_entropy(fresh(x[32 * j:32 * (j + 1)].cuda()), y[32 * j:32 * (j + 1)].cuda(),
                                   reduction="none").double().cpu()
        torch.testing.assert_close(torch.from_numpy(store.loss[32 * j:32 * (j + 1)]), want, rtol=1e-5, atol=1e-6)
    still = []
    for depth in (0, 2):
        torch.manual_seed(0)
        frozen = SmallCNN().cuda()
        ld = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=32), sb.ScoringHook(frozen),
                                "sb", fraction=0.25, rebatch=rebatch, batch_size=16, seed=0, device="cuda",
                                lookahead=depth, select_on="host")
        still.append([(b.indices.tolist(), b.weights.tolist()) for b in ld])
    assert still[0] == still[1]


def test_fully_shard_scoring_on_one_gpu_matches_the_unsharded_model():
    """FSDP2 on the GPU (NCCL, one process): scoring through the sharded root equals the unsharded model's, and a
    few selective steps train (issue 24; the two-rank agreement itself is tested on CPU in tests/test_fsdp.py)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = SmallCNN().cuda()
        torch.manual_seed(0)
        model = SmallCNN().cuda()
        fully_shard(model.fc)
        fully_shard(model)
        x, y = (t.cuda() for t in data(128))
        want, got = sb.ScoringHook(plain).score(x, y), sb.ScoringHook(model).score(x, y)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.as_tensor(got.gram()), torch.as_tensor(want.gram()), rtol=1e-4, atol=1e-5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = sb.SelectiveLoader([(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)], sb.ScoringHook(model),
                                    "sb", fraction=0.25, seed=0, sharded=True)
        for b in loader:
            loss = sb.weighted_loss(F.cross_entropy(model(b.inputs), b.targets, reduction="none"), b.weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loader.stats.steps == 4
    finally:
        dist.destroy_process_group()
