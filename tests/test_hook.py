"""ScoringHook: closed-form losses and last-layer gradients against autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import sbsampler as sb


def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5, bias=bias))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.fc = nn.Linear(32, 7)

    def forward(self, x):
        return self.fc(self.body(x))


def per_sample_head_grads(model, head, x, y, loss_fn):
    """(B, C*d [+ C]) per-sample gradients of the head's weight and bias, by torch.func."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    names = [n for n, p in model.named_parameters() if p is head.weight or p is head.bias]

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return loss_fn(out, yi[None])[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)


def assert_close_rel(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


CASES = [
    ("mlp", 0.0, True),
    ("mlp", 0.1, True),
    ("mlp-nobias", 0.0, False),
    ("cnn", 0.0, True),
    ("cnn", 0.2, True),
]


@pytest.mark.parametrize("arch,smoothing,bias", CASES)
def test_gram_and_norms_match_autograd(arch, smoothing, bias):
    torch.manual_seed(0)
    model = SmallCNN() if arch == "cnn" else mlp(bias)
    model = model.double()
    x = torch.randn(9, 3, 5, 5, dtype=torch.float64) if arch == "cnn" else torch.randn(9, 6, dtype=torch.float64)
    hook = sb.ScoringHook(model, label_smoothing=smoothing)
    n_classes = hook.num_classes
    y = torch.randint(0, n_classes, (9,))
    if arch == "cnn":  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 3, 5, 5, dtype=torch.float64) * 2 + 1)
    scores = hook.score(x, y)
    loss_fn = lambda z, t: F.cross_entropy(z, t, reduction="none", label_smoothing=smoothing)  # noqa: E731
    g = per_sample_head_grads(model, hook.head, x, y, loss_fn).to(scores.gram().dtype)
    assert_close_rel(scores.gram(), g @ g.T)
    assert_close_rel(scores.grad_norms(), g.norm(dim=1))
    model.eval()
    with torch.no_grad():
        expected_loss = loss_fn(model(x), y)
    assert_close_rel(scores.loss.double(), expected_loss)


def test_callable_loss_matches_autograd():
    torch.manual_seed(1)
    model = mlp().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))

    def focal(z, t):
        logp = torch.log_softmax(z, 1).gather(1, t[:, None])[:, 0]
        return -((1 - logp.exp()) ** 2) * logp

    scores = sb.ScoringHook(model, loss=focal).score(x, y)
    g = per_sample_head_grads(model, model[-1], x, y, focal).float()
    assert_close_rel(scores.gram(), g @ g.T)


def test_scoring_leaves_model_untouched():
    torch.manual_seed(0)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 5, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 3, 5, 5) * 3, torch.randint(0, 7, (10,))
    for train_mode in (False, True):
        hook = sb.ScoringHook(model, train_mode=train_mode)
        for mode in (True, False):
            model.train(mode)
            hook.score(x, y)
            assert model.training is mode
        hook.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_uses_batch_statistics():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.randn(10, 3, 5, 5) * 3 + 2, torch.randint(0, 7, (10,))
    eval_loss = sb.ScoringHook(model).score(x, y).loss
    train_loss = sb.ScoringHook(model, train_mode=True).score(x, y).loss
    model.train()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(train_loss, expected)
    assert not torch.allclose(eval_loss, train_loss)


def test_hook_is_inert_outside_score():
    model = mlp()
    hook = sb.ScoringHook(model)
    model(torch.randn(4, 6))
    assert hook._captured is None


def test_head_found_automatically_and_explicitly():
    model = SmallCNN()
    assert sb.ScoringHook(model).head is model.fc
    assert sb.find_head(model) is model.fc


def test_model_without_linear_layer_is_scored_for_losses_only():
    """A 1x1-conv head: the loss strategies work; a gradient strategy says what it needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    scores = sb.ScoringHook(model).score(x, y)
    with torch.no_grad():
        torch.testing.assert_close(scores.loss, F.cross_entropy(model(x), y, reduction="none"))
    assert scores.logit_grad is None and len(sb.TopK().select(scores, 3).indices) == 3
    with pytest.raises(ValueError, match="losses only.*head="):
        sb.GradientMatching().select(scores, 3)


def test_error_when_head_is_not_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        sb.ScoringHook(mlp(), head=nn.Conv2d(1, 1, 1))


def test_error_when_head_not_reached():
    model = mlp()
    unused = nn.Linear(3, 5)
    hook = sb.ScoringHook(model, head=unused)
    with pytest.raises(RuntimeError, match="not called"):
        hook.score(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_error_for_non_2d_features():
    model = nn.Sequential(nn.Linear(6, 5))
    hook = sb.ScoringHook(model)
    with pytest.raises(ValueError, match="flatten"):
        hook.score(torch.randn(4, 3, 6), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "targets,err,match",
    [
        (torch.tensor([0, 1, 5, 2]), ValueError, "out of range"),
        (torch.tensor([0, -1, 1, 2]), ValueError, "out of range"),
        (torch.tensor([0.0, 1.0, 1.0, 2.0]), TypeError, "integer"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        ([0, 1, 2, 3], TypeError, "torch.Tensor"),
    ],
)
def test_target_validation(targets, err, match):
    hook = sb.ScoringHook(mlp())
    with pytest.raises(err, match=match):
        hook.score(torch.randn(4, 6), targets)


def test_callable_loss_must_be_per_sample():
    hook = sb.ScoringHook(mlp(), loss=lambda z, t: F.cross_entropy(z, t))
    with pytest.raises(ValueError, match="per-sample"):
        hook.score(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_scores_subset_and_losses_only():
    scores = sb.ScoringHook(mlp()).score(torch.randn(6, 6), torch.arange(6) % 5)
    part = scores.subset(torch.tensor([0, 2]))
    assert len(part) == 2 and part.features.shape == (2, 12)
    with pytest.raises(ValueError, match="losses only"):
        sb.Scores(loss=torch.ones(3)).gram()


def test_amp_scoring_matches_float32_closely():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))
    full = sb.ScoringHook(model).score(x, y)
    amp = sb.ScoringHook(model, amp_dtype=torch.bfloat16).score(x, y)
    assert amp.loss.dtype == torch.float32 and amp.features.dtype == torch.float32
    torch.testing.assert_close(amp.loss, full.loss, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="amp_dtype"):
        sb.ScoringHook(model, amp_dtype=torch.float64)


class FrozenParts(nn.Module):
    """A BatchNorm frozen with .eval() and a Dropout switched off with .eval(), inside a model in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.body(x)))))


@pytest.mark.parametrize("train_mode", [False, True])
def test_scoring_keeps_each_modules_own_mode(train_mode):
    torch.manual_seed(0)
    model = FrozenParts().train()
    model.bn.eval()
    model.drop.eval()
    x, y = torch.randn(32, 6) * 3 + 1, torch.randint(0, 5, (32,))
    hook = sb.ScoringHook(model, train_mode=train_mode)
    first = hook.score(x, y).loss
    assert model.training and not model.bn.training and not model.drop.training  # frozen parts stay frozen
    torch.testing.assert_close(hook.score(x, y).loss, first)  # dropout stayed off while scoring
    before = model.bn.running_mean.clone()
    model(x)  # the next training forward: the frozen BatchNorm must not move its statistics
    torch.testing.assert_close(model.bn.running_mean, before)


def test_label_smoothing_with_a_callable_loss_is_refused():
    loss = lambda z, y: F.cross_entropy(z, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match="label_smoothing applies to the built-in"):
        sb.ScoringHook(mlp(), loss=loss, label_smoothing=0.1)
    sb.ScoringHook(mlp(), loss=loss)  # without smoothing: fine


class TwoHeads(nn.Module):
    """Returns (logits, projection); the projection is registered last, so find_head picks it first."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)
        self.proj = nn.Linear(16, 32)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), self.proj(h)


class ClassifierFirst(nn.Module):
    """The classifier is registered before its encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        return self.fc(self.encoder(x))


class Tempered(ClassifierFirst):
    def forward(self, x):
        return self.fc(self.encoder(x)) / 2.0  # temperature after the head


class TwoViews(ClassifierFirst):
    def forward(self, x):
        return (self.fc(self.encoder(x)) + self.fc(self.encoder(x.flip(1)))) / 2  # the head runs twice


@pytest.mark.parametrize("cls", [TwoHeads, ClassifierFirst])
def test_an_automatically_found_head_is_checked_and_corrected(cls):
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    hook = sb.ScoringHook(model)
    assert hook.head is not model.fc  # registration order picks the wrong layer
    scores = hook.score(x, y)
    assert hook.head is model.fc and hook.num_classes == 4 and scores.logit_grad.shape == (16, 4)
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(scores.loss, F.cross_entropy(logits, y, reduction="none"))


def test_a_given_head_that_is_not_the_logits_is_refused_naming_the_right_one():
    model = TwoHeads()
    with pytest.raises(ValueError, match=r"'proj' \(Linear\(16, 32\)\) is not the layer.*logits come from 'fc'"):
        sb.ScoringHook(model, head=model.proj).score(torch.randn(8, 6), torch.randint(0, 4, (8,)))


def test_logits_changed_after_the_head_are_refused():
    with pytest.raises(ValueError, match="no linear layer outputs them"):
        sb.ScoringHook(Tempered()).score(torch.randn(8, 6), torch.randint(0, 4, (8,)))


def test_a_head_that_runs_twice_is_refused():
    with pytest.raises(RuntimeError, match="ran 2 times"):
        sb.ScoringHook(TwoViews()).score(torch.randn(8, 6), torch.randint(0, 4, (8,)))


def test_cheap_scoring_options_keep_the_scores():
    """channels_last and compile (issue 23): the same losses, gradients and Gram to float round-off; compile= with a
    forward= callable is refused, and a copy of a compiled hook compiles again."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    ref = sb.ScoringHook(model).score(x, y)
    for hook in (sb.ScoringHook(model, channels_last=True), sb.ScoringHook(model, compile=True)):
        got = hook.score(x, y)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.as_tensor(got.gram()), torch.as_tensor(ref.gram()), rtol=1e-4, atol=1e-6)
    assert hook._compiled is not None and copy.deepcopy(hook)._compiled is None
    with pytest.raises(ValueError, match="with a forward= callable, compile inside it"):
        sb.ScoringHook(model, forward=lambda t: model(t), compile=True)
    with pytest.raises(TypeError, match="compile must be None, a bool or a torch.compile mode name"):
        sb.ScoringHook(model, compile=3)
