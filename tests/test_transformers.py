"""Real transformers through SelectiveLoader: a tiny BERT classifier on dict batches with every strategy,
and a tiny causal LM with per-sample token losses (exact and sketched Gram for gradmatch).

Models are built from small configs (no downloaded weights). ``transformers`` is a test extra; CI sets
SBSAMPLER_REQUIRE_TRANSFORMERS=1 so that a missing install fails instead of skipping.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import sbsampler as sb
from sbsampler.strategies import fraction_for

if os.environ.get("SBSAMPLER_REQUIRE_TRANSFORMERS") == "1":
    import transformers  # noqa: F401 - must be importable in CI
else:
    pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
KEYS = sb.BatchKeys(inputs=None, targets="labels", indices="index")
N, T, BS = 96, 12, 24


def token_batches(vocab, labels_fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::5, -3:] = 0  # some padded rows
    labels = labels_fn(ids, mask)
    batches = [{"input_ids": ids[i:i + BS], "attention_mask": mask[i:i + BS], "labels": labels[i:i + BS],
                "index": torch.arange(i, i + BS)} for i in range(0, N, BS)]
    return ids, mask, batches


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sb", "composer", "gradmatch", "importance", "infobatch",
                                      "full"])
def test_bert_classifier_on_dict_batches(strategy):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(cfg)
    ids, mask, batches = token_batches(100, lambda i, m: i[:, 0] % 3)
    hook = sb.ScoringHook(model)  # model(**inputs), output.logits, head = model.classifier
    loader = sb.SelectiveLoader(batches, hook, strategy, fraction=fraction_for(strategy, 0.5), seed=0, batch_keys=KEYS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        for b in loader:
            assert set(b.inputs) == {"input_ids", "attention_mask"}
            assert torch.equal(b.inputs["input_ids"], ids[b.indices])  # the original rows
            assert torch.equal(b.inputs["attention_mask"], mask[b.indices])
            out = model(**b.inputs).logits
            loss = sb.weighted_loss(F.cross_entropy(out, b.targets, reduction="none"), b.weights)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert hook.head is model.classifier
    assert loader.stats.samples_seen == 2 * N and loader.stats.steps > 0


def lm_loss(logits, labels):
    """Mean next-token loss per sample; labels of -100 (padding) are ignored."""
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    return per_token.sum(1) / (labels[:, 1:] != -100).sum(1).clamp_min(1)


@pytest.mark.parametrize("strategy,exact_limit", [("uniform", 65536), ("sb", 65536), ("infobatch", 65536),
                                                  ("gradmatch", 65536), ("gradmatch", 1), ("importance", 1)])
def test_causal_lm_with_per_sample_token_losses(strategy, exact_limit):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids, mask, batches = token_batches(64, lambda i, m: torch.where(m.bool(), i, torch.full_like(i, -100)))
    hook = sb.ScoringHook(model, loss=lm_loss, exact_limit=exact_limit, sketch_dim=16)
    first = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    scores = hook.score(first, batches[0]["labels"])
    with torch.no_grad():
        model.eval()
        ref = lm_loss(model(**first).logits, batches[0]["labels"])
    torch.testing.assert_close(scores.loss, ref)
    if strategy in ("gradmatch", "importance"):
        assert scores.grads.shape == (BS, 64 * 32 if exact_limit > 1 else 16 * 16)  # lm_head has no bias
    loader = sb.SelectiveLoader(batches, hook, strategy, fraction=fraction_for(strategy, 0.25), seed=0, batch_keys=KEYS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in loader:
        assert torch.equal(b.inputs["input_ids"], ids[b.indices])
        loss = sb.weighted_loss(lm_loss(model(**b.inputs).logits, b.targets), b.weights)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loader.stats.samples_scored == (N if loader.strategy.needs_scores else 0)  # uniform runs no scoring
