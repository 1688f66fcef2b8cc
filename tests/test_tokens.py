"""Rho-1 token selection (issue 25): the rule written out, and SelectiveTrainer(tokens=) on a tiny GPT-2 built
from a config: the kept share, the global token mean under gradient accumulation and 2 processes, resume."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sbsampler as sb
from sbsampler.tokens import TokenSelection, kept_tokens, select_tokens, selective_lm_loss, token_losses

HERE = Path(__file__).resolve().parent
N, T, V = 24, 9, 40


def keep_by_hand(excess, valid, fraction):
    """The rule as Rho-1 states it: the top ceil(fraction * n) of the n label tokens by excess loss (ties: the
    earlier position), written as a plain sort over Python numbers."""
    rows, cols = excess.shape
    items = [(float(excess[b, t]), b * cols + t) for b in range(rows) for t in range(cols) if bool(valid[b, t])]
    k = max(1, math.ceil(fraction * len(items) - 1e-9)) if items else 0
    items.sort(key=lambda item: (-item[0], item[1]))
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    for _, flat in items[:k]:
        keep[flat] = True
    return keep.view(rows, cols)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_select_tokens_is_the_written_out_rule(rows, cols, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    excess = torch.randint(-3, 4, (rows, cols), generator=g).double() / 2  # many ties
    valid = torch.rand(rows, cols, generator=g) < 0.7
    keep = select_tokens(excess, valid, fraction)
    assert torch.equal(keep, keep_by_hand(excess, valid, fraction))
    assert int(keep.sum()) == kept_tokens(valid.sum(), fraction)
    assert not bool((keep & ~valid).any())


def test_kept_counts_and_refusals():
    assert [kept_tokens(n, 0.3) for n in (0, 1, 3, 10, 11)] == [0, 1, 1, 3, 4]
    assert kept_tokens(10, 1.0) == 10
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select_tokens(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="not finite"):
        select_tokens(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2, dtype=torch.bool), 0.5)
    # a NaN on an ignored position is never ranked
    keep = select_tokens(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[False, True]]), 0.5)
    assert keep.tolist() == [[False, True]]
    with pytest.raises(ValueError, match="layout"):
        selective_lm_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), 0.5,
                          shift=True)
    with pytest.raises(ValueError, match="finite everywhere"):
        TokenSelection(0.5, torch.full((3, 4), float("nan")))
    with pytest.raises(TypeError, match="nn.Module"):
        TokenSelection(0.5, [1.0, 2.0])


def test_selective_lm_loss_is_the_kept_tokens_mean_and_divides_by_the_given_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (3, 6), generator=g)
    labels[0, 4:] = -100
    ref = torch.rand(3, 5, generator=g)
    out = selective_lm_loss(logits, labels, ref, 0.4, shift=True)
    per = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1),
                                            reduction="none", ignore_index=-100).view(3, 5)
    valid = labels[:, 1:] != -100
    keep = keep_by_hand(per.detach() - ref, valid, 0.4)
    assert torch.equal(out.kept, keep) and out.num_valid == int(valid.sum()) == 13 and out.num_kept == 6
    torch.testing.assert_close(out.loss, per[keep].sum() / 6)
    torch.testing.assert_close(selective_lm_loss(logits, labels, ref, 0.4, shift=True, num_kept=24).loss,
                               per[keep].sum() / 24)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -1.0, float("nan"), True, "0.5"])
def test_a_token_fraction_is_checked_as_every_fraction_is(fraction):
    """kept_tokens(10, f) clamped f = 0 / 1.5 / -1 to 1 / 10 / 1 and failed cryptically on NaN; TokenSelection took
    True and "0.5", which every other fraction refuses (issue 31, item 6)."""
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
        kept_tokens(10, fraction)
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
        TokenSelection(fraction, torch.zeros(3, 4))


def test_a_zero_kept_count_gives_a_zero_loss_as_an_int_or_a_tensor():
    """num_kept=torch.tensor(0) (a step with no label token) gave NaN, where the int 0 gives 0."""
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), -100)
    ref = torch.zeros(2, 3)
    for count in (0, torch.tensor(0), torch.tensor(0.0)):
        out = selective_lm_loss(logits, labels, ref, 0.5, shift=True, num_kept=count)
        assert float(out.loss) == 0.0
    with pytest.raises(ValueError, match="num_kept"):
        selective_lm_loss(logits, labels, ref, 0.5, shift=True, num_kept=-1)


# --- SelectiveTrainer(tokens=) on a tiny GPT-2 ---------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from sbsampler.integrations.transformers import STATE_FILE, SelectiveTrainer  # noqa: E402

hf_logging.set_verbosity_error()


def gpt2(seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def lm_data(indices=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::3, -4:] = 0  # padded rows: fewer label tokens in some micro-batches
    labels = ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(N)]
    if indices:
        rows = [{**r, "indices": torch.tensor(i)} for i, r in enumerate(rows)]
    return rows


def sgd_args(out, **kw):
    """Plain SGD, constant LR, no clipping: one step moves the parameters by exactly -lr * grad."""
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                warmup_steps=0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


class TokenRecording(SelectiveTrainer):
    """Keeps each training micro-batch and the divisor it was given."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches = getattr(self, "batches", []) + [{k: v.detach().cpu().clone() for k, v in inputs.items()}]
            self.num_items = getattr(self, "num_items", []) + [num_items_in_batch]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def hand_step(batches, model, reference, fraction, lr):
    """Parameters after one SGD step on the global mean of the kept tokens' losses over ``batches``, every batch
    selecting its own top share by excess loss over ``reference``: the normalisation written out."""
    model = copy.deepcopy(model)
    total, count = 0.0, 0
    for b in batches:
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        labels = b["labels"][:, 1:]
        logits = model(**inputs).logits[:, :-1]
        per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        with torch.no_grad():
            ref_logits = reference(**inputs).logits[:, :-1]
            ref = torch.nn.functional.cross_entropy(ref_logits.transpose(1, 2), labels, reduction="none",
                                                    ignore_index=-100)
        keep = keep_by_hand(per.detach() - ref, labels != -100, fraction)
        total = total + per[keep].sum()
        count += int(keep.sum())
    (total / count).backward()
    with torch.no_grad():
        return {k: p - lr * p.grad for k, p in model.named_parameters()}, count


def assert_params(trained: dict, expected: dict):
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_one_step_under_accumulation_is_the_global_mean_over_kept_tokens(tmp_path):
    model, reference = gpt2(0), gpt2(1)
    start = copy.deepcopy(model)
    t = TokenRecording(model=model, args=sgd_args(tmp_path), train_dataset=lm_data(),
                       tokens=TokenSelection(0.3, reference))
    t.train()
    assert len(t.batches) == 2  # one optimizer step = 2 accumulated micro-batches
    expected, count = hand_step(t.batches, start, gpt2(1), 0.3, 0.5)
    assert [int(n) for n in t.num_items] == [count, count]  # one divisor for the whole step
    assert_params(dict(model.named_parameters()), expected)
    # a mean of per-micro-batch means would differ: the micro-batches keep different counts here
    kept = [kept_tokens((b["labels"][:, 1:] != -100).sum(), 0.3) for b in t.batches]
    assert kept[0] != kept[1]


@pytest.mark.slow
def test_two_processes_divide_by_the_global_kept_count(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    subprocess.run([sys.executable, str(HERE / "_tokens_worker.py"), str(tmp_path)], check=True, env=env,
                   timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    batches = ranks[0]["batches"] + ranks[1]["batches"]
    assert len(batches) == 4  # 2 micro-batches on each process
    expected, count = hand_step(batches, gpt2(0), gpt2(1), 0.3, 0.5)
    assert ranks[0]["num_items"] == ranks[1]["num_items"] == [count, count]
    for r in ranks:
        assert_params({k: v for k, v in r["params"].items()}, expected)


def test_kept_share_and_counts_over_an_epoch(tmp_path):
    t = TokenRecording(model=gpt2(0), args=sgd_args(tmp_path, max_steps=-1, num_train_epochs=1),
                       train_dataset=lm_data(), tokens=TokenSelection(0.6, gpt2(1)))
    t.train()
    valid = [int((b["labels"][:, 1:] != -100).sum()) for b in t.batches]
    assert t.token_counts == {"tokens_seen": sum(valid), "tokens_kept": sum(kept_tokens(n, 0.6) for n in valid)}
    assert t.token_counts["tokens_seen"] == N * (T - 1) - 8 * 4  # 8 padded rows, 4 labels fewer each
    assert abs(t.token_counts["tokens_kept"] / t.token_counts["tokens_seen"] - 0.6) < 0.02


def test_a_stored_reference_trains_as_the_reference_model(tmp_path):
    data = lm_data(indices=True)
    reference = gpt2(1)
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        mask = torch.stack([d["attention_mask"] for d in data])
        labels = torch.stack([d["labels"] for d in data])
        table, _ = token_losses(reference(input_ids=ids, attention_mask=mask).logits, labels, shift=True)
    live, stored = gpt2(0), gpt2(0)
    TokenRecording(model=live, args=sgd_args(tmp_path / "a", max_steps=3, remove_unused_columns=False),
                   train_dataset=data, tokens=TokenSelection(0.3, reference)).train()
    TokenRecording(model=stored, args=sgd_args(tmp_path / "b", max_steps=3, remove_unused_columns=False),
                   train_dataset=data, tokens=TokenSelection(0.3, table.numpy())).train()
    assert_params(dict(stored.named_parameters()), dict(live.named_parameters()))
    no_index = SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path / "c"), train_dataset=lm_data(),
                                tokens=TokenSelection(0.3, table))
    with pytest.raises(ValueError, match="'indices'"):
        no_index.train()


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    def run(out, epochs, resume=None):
        model = gpt2(0)
        t = SelectiveTrainer(model=model, args=sgd_args(out, max_steps=-1, num_train_epochs=epochs,
                                                        save_strategy="epoch"),
                             train_dataset=lm_data(), tokens=TokenSelection(0.5, gpt2(1)))
        t.train(resume_from_checkpoint=resume)
        return model, t

    straight, full = run(tmp_path / "a", 2)
    _, first = run(tmp_path / "b", 1)
    ckpt = tmp_path / "b" / "checkpoint-3"
    assert torch.load(ckpt / STATE_FILE, weights_only=True) == {"tokens": first.token_counts}
    resumed, t = run(tmp_path / "b", 2, resume=str(ckpt))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert t.token_counts == full.token_counts
    # a checkpoint of sequence selection is refused, and the other way round
    seq = SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path / "c", max_steps=-1, num_train_epochs=1,
                                                        save_strategy="epoch"), train_dataset=lm_data(),
                           strategy="sb", seed=0)
    seq.train()
    with pytest.raises(ValueError, match="not tokens"):
        run(tmp_path / "c", 2, resume=str(tmp_path / "c" / "checkpoint-3"))


def test_token_selection_refuses_sequence_rules_and_a_per_sample_loss(tmp_path):
    with pytest.raises(ValueError, match="not supported together"):
        SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path), train_dataset=lm_data(), strategy="sb",
                         tokens=TokenSelection(0.5, gpt2(1)))
    with pytest.raises(ValueError, match="loss="):
        SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path), train_dataset=lm_data(),
                         loss=lambda logits, labels: logits.sum((1, 2)), tokens=TokenSelection(0.5, gpt2(1)))
    with pytest.raises(TypeError, match="TokenSelection"):
        SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path), train_dataset=lm_data(), tokens=0.5)
    assert sb.tokens.TokenSelection is TokenSelection


@pytest.mark.parametrize("smaller", ["vocabulary", "positions"])
def test_a_live_reference_smaller_than_the_batch_is_named(tmp_path, smaller):
    """A reference with a smaller vocabulary or fewer positions than the batch failed 19 frames deep with "index out
    of range in self" (issue 31, item 11): the error names the reference and both sizes."""
    torch.manual_seed(1)
    kw = dict(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    kw["vocab_size" if smaller == "vocabulary" else "n_positions"] = 8 if smaller == "vocabulary" else 4
    reference = GPT2LMHeadModel(GPT2Config(**kw))
    trainer = SelectiveTrainer(model=gpt2(0), args=sgd_args(tmp_path), train_dataset=lm_data(),
                               tokens=TokenSelection(0.5, reference))
    want = (rf"reference model \(GPT2LMHeadModel\) has 8 token embeddings, the training model's logits {V}"
            if smaller == "vocabulary" else
            rf"reference model \(GPT2LMHeadModel\) takes 4 positions, the batch has {T}")
    with pytest.raises(ValueError, match=want):
        trainer.train()
