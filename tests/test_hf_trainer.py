"""HuggingFace Trainer: SelectiveTrainer on tiny models built from configs, on CPU."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("SBSAMPLER_REQUIRE_TRANSFORMERS") == "1":
    import transformers  # noqa: F401 - must be importable in CI
else:
    pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402
from sbsampler.integrations.transformers import STATE_FILE, SelectiveTrainer, per_sample_loss  # noqa: E402

hf_logging.set_verbosity_error()
N, T = 64, 10


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def dataset(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::4, -3:] = 0
    if kind == "cls":
        labels = ids[:, 0] % 3
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(N)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                num_train_epochs=1, learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no",
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("kind", ["cls", "lm"])
def test_full_strategy_accumulates_the_mean_loss(tmp_path, kind):
    """With every row at weight 1/B, batches of 8 accumulated twice train exactly as the plain Trainer on
    batches of 16: the mean loss of the classifier, the token-mean (num_items_in_batch) of the causal LM."""
    make = bert if kind == "cls" else gpt2
    plain = make()
    Trainer(model=plain, args=args(tmp_path / "a", per_device_train_batch_size=16, gradient_accumulation_steps=1),
            train_dataset=dataset(kind)).train()
    ours = make()
    t = SelectiveTrainer(model=ours, args=args(tmp_path / "b"), train_dataset=dataset(kind), strategy="full")
    t.train()
    for a, b in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert t.selector.stats.samples_yielded == N
    if kind == "lm":  # and the plain Trainer with the same accumulation agrees, since GPT-2 uses num_items
        same = make()
        Trainer(model=same, args=args(tmp_path / "c"), train_dataset=dataset(kind)).train()
        for a, b in zip(same.parameters(), ours.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class Recording(SelectiveTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        before = self.selector.stats.samples_yielded
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.rows = getattr(self, "rows", 0) + self.selector.stats.samples_yielded - before
        self.num_items = num_items_in_batch
        return loss


@pytest.mark.parametrize("kind,strategy", [("cls", "sb"), ("cls", "importance"), ("lm", "uniform"),
                                           ("lm", "gradmatch")])
def test_selected_rows_and_weights_are_trained_on(tmp_path, kind, strategy):
    model = bert() if kind == "cls" else gpt2()
    t = Recording(model=model, args=args(tmp_path), train_dataset=dataset(kind), strategy=strategy,
                  fraction=fraction_for(strategy, 0.25),
                  seed=0)
    t.train()
    stats = t.selector.stats
    assert stats.samples_seen == N and t.rows == stats.samples_yielded == N // 4
    assert t.state.global_step == N // 16  # batch 8, accumulation 2: the Trainer's own step count
    # one micro-batch by hand: the loss is sum w_i l_i (scaled as the Trainer scales its own)
    batch = {k: torch.stack([d[k] for d in dataset(kind)[:8]]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    sel = sb.BatchSelector(t.selector.hook, strategy, 0.25, seed=1, batch_keys=sb.BatchKeys(inputs=None,
                                                                                           targets="labels"))
    t.selector = sel
    state = sel.strategy.state_dict()
    loss = t.compute_loss(model, dict(batch), num_items_in_batch=None)
    sel.strategy.load_state_dict(state)
    sub = sel(dict(batch))
    shift = kind == "lm"
    ref = (per_sample_loss(model(**sub.inputs).logits, sub.targets, shift=shift) * sub.weights).sum()
    torch.testing.assert_close(loss, ref)


def test_resume_from_a_trainer_checkpoint(tmp_path):
    def run(out, epochs, resume=None):
        model = bert()
        t = SelectiveTrainer(model=model, args=args(out, num_train_epochs=epochs, save_strategy="epoch",
                                                    lr_scheduler_type="constant"),
                             train_dataset=dataset("cls"), strategy="sb", fraction=0.25, seed=0)
        t.train(resume_from_checkpoint=resume)
        return model, t

    straight, _ = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    ckpt = tmp_path / "b" / "checkpoint-4"
    assert (ckpt / STATE_FILE).is_file()
    resumed, t = run(tmp_path / "b", 2, resume=str(ckpt))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert t.selector.stats.samples_seen == 2 * N
    with pytest.raises(FileNotFoundError, match="SelectiveTrainer"):
        (ckpt / STATE_FILE).unlink()
        run(tmp_path / "b", 2, resume=str(ckpt))


def test_the_gpu_checks_are_read_at_each_epoch_end(tmp_path, monkeypatch):
    """The hook's deferred checks (read late on a GPU) are flushed when each training epoch ends."""
    from sbsampler.deferred import DeferredChecks

    calls = []
    monkeypatch.setattr(DeferredChecks, "flush", lambda self: calls.append(self))
    t = SelectiveTrainer(model=bert(), args=args(tmp_path, num_train_epochs=2), train_dataset=dataset("cls"),
                         strategy="sb", fraction=0.25, seed=0)
    t.train()
    assert len(calls) == 2 and all(c is t.selector.hook.checks for c in calls)


def test_labels_under_another_key_are_selected_by(tmp_path):
    """TrainingArguments(label_names=["target"]): every batch went through the plain Trainer's loss and the
    selector saw nothing (issue 22, item 4). The targets are read from the one label name."""
    data = [{"input_ids": d["input_ids"], "attention_mask": d["attention_mask"], "target": d["labels"]}
            for d in dataset("cls")]
    t = Recording(model=bert(), args=args(tmp_path, label_names=["target"]), train_dataset=data, strategy="sb",
                  fraction=0.25, seed=0)
    t.train()
    assert t.selector.stats.samples_seen == N and t.rows == t.selector.stats.samples_yielded == N // 4


def test_a_training_batch_without_its_labels_or_with_two_label_names_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"selects by one targets field, got label_names=\['start_positions', "
                                         r"'end_positions'\]"):
        SelectiveTrainer(model=bert(), args=args(tmp_path, label_names=["start_positions", "end_positions"]),
                         train_dataset=dataset("cls"))
    t = SelectiveTrainer(model=bert(), args=args(tmp_path), train_dataset=dataset("cls"), strategy="sb")
    model = t.model.train()
    batch = {k: torch.stack([d[k] for d in dataset("cls")[:8]]) for k in ("input_ids", "attention_mask")}
    with pytest.raises(KeyError, match="the training batch has no 'labels'"):
        t.compute_loss(model, batch)


def test_rho_loss_through_the_trainer_looks_up_each_samples_reference(tmp_path):
    """RhoLoss inside SelectiveTrainer (issue 25): a dataset index column under "indices" (kept with
    remove_unused_columns=False; the model never sees it) finds each sample's reference loss."""
    data = [{**d, "indices": torch.tensor(i)} for i, d in enumerate(dataset("cls"))]
    reference = torch.rand(N, generator=torch.Generator().manual_seed(0)).numpy()
    t = Recording(model=bert(), args=args(tmp_path, remove_unused_columns=False), train_dataset=data,
                  strategy=sb.RhoLoss(reference=reference), fraction=0.25)
    t.train()
    assert t.selector.stats.samples_seen == N and t.rows == N // 4
    no_index = SelectiveTrainer(model=bert(), args=args(tmp_path / "b"), train_dataset=dataset("cls"),
                                strategy=sb.RhoLoss(reference=reference), fraction=0.25)
    with pytest.raises(ValueError, match="indices"):
        no_index.train()
