"""DDP with the real engine: 2 gloo processes, every strategy, with/without rebatching, uneven shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import sbsampler as sb
from conftest import run_ranks  # noqa: E402
from sbsampler.distributed import LocalSync

_MERGED: dict = {}

pytestmark = [pytest.mark.slow,  # multi-process: python -m pytest -q -m slow (CI runs it)
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    r0, r1 = run_ranks("_ddp_worker.py", tmp_path_factory.mktemp("ddp"), timeout=240)
    _MERGED["stores"] = (r0["merged_store"], r1["merged_store"])
    return r0["configs"], r0["results"], r1["results"]


def test_ranks_take_equal_steps_of_equal_size(ddp_results):
    configs, r0, r1 = ddp_results
    for cfg, a, b in zip(configs, r0, r1):
        assert a["sizes"] == b["sizes"], cfg
        assert sum(map(len, a["sizes"])) > 0, cfg
        if cfg["rebatch"]:  # every step but an epoch's last is a full batch
            assert all(s == 32 for ep in a["sizes"] for s in ep[:-1]), cfg


def test_parameters_stay_identical_across_ranks(ddp_results):
    configs, r0, r1 = ddp_results
    for cfg, a, b in zip(configs, r0, r1):
        assert a["same_params_as_rank0"] and b["same_params_as_rank0"], cfg


def test_nothing_selected_is_lost(ddp_results):
    configs, r0, r1 = ddp_results
    for cfg, a, b in zip(configs, r0, r1):
        for rank, res in enumerate((a, b)):
            s = res["stats"]
            n = 2 * (320 if rank == 0 or not cfg["uneven"] else 190)
            assert s["samples_seen"] == n, cfg
            assert s["samples_seen"] == s["samples_selected"] + s["samples_not_selected"] + s["samples_skipped"], cfg
            if cfg["strategy"] != "importance":  # with replacement: repeats yield twice
                assert s["samples_yielded"] + s["samples_dropped"] == s["samples_selected"], (cfg, rank, s)
            if not cfg["drop_last"]:
                assert s["samples_dropped"] == 0, cfg


def test_uneven_shards_are_padded_not_dropped(ddp_results):
    configs, r0, r1 = ddp_results
    for cfg, a, b in zip(configs, r0, r1):
        if cfg["uneven"] and not cfg["drop_last"]:
            assert b["stats"]["samples_padded"] > 0, cfg  # the short rank pads while rank 0 still has data


def test_sync_history_shares_the_loss_history(ddp_results):
    configs, r0, r1 = ddp_results
    for cfg, a, b in zip(configs, r0, r1):
        if cfg["strategy"].startswith("sb"):
            if cfg["sync_history"]:
                assert a["history"] == b["history"], cfg
                assert len(a["history"]) == 300
            else:
                assert not np.array_equal(a["history"], b["history"]), cfg


def test_score_store_merge_across_ranks(ddp_results):
    a, b = _MERGED["stores"]
    assert a == b  # every rank holds the same store afterwards
    assert a["loss"] == [1.0] * 4 + [2.0] * 6  # the latest epoch wins where both scored (4, 5)
    assert a["grad_norm"] == [10.0] * 4 + [20.0] * 6
    assert a["seen"] == [1] * 4 + [2] * 6


class ScriptedPeer(LocalSync):
    """This process plus a scripted second rank: nothing ready during the rounds, ``tail`` rows queued at the end."""

    world_size = 2

    def __init__(self, tail: int, size: int) -> None:
        self.tail, self.size = tail, size

    def min_max(self, values):
        if len(values) == 5:  # a rebatching round: the peer has no batch ready, runs out with this rank, no error
            other = [0, values[1], 0, 0, 1]
        else:  # the tail: full batches, batches needed, rows queued, rows to pad with
            other = [self.tail // self.size, -(-self.tail // self.size), self.tail, 1]
        return [min(a, b) for a, b in zip(values, other)], [max(a, b) for a, b in zip(values, other)]


def test_the_tail_pads_to_the_longest_ranks_rows_not_to_a_full_batch():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    loader = sb.SelectiveLoader(batches, sb.ScoringHook(nn.Linear(4, 3)), "topk", fraction=0.25, rebatch=True,
                                batch_size=8, distributed=ScriptedPeer(tail=11, size=8))
    steps = list(loader)
    # this rank queued 6 rows, the peer 11: two steps, of 8 (the peer's full batch) and 3 (its remainder)
    assert [len(s) for s in steps] == [8, 3]
    assert loader.stats.samples_yielded == 6 and loader.stats.samples_padded == 5
    torch.testing.assert_close(steps[0].weights[:6].sum(), torch.tensor(1.0))
    assert steps[0].weights[6:].abs().sum() == 0 and steps[1].weights.abs().sum() == 0


def _failure_run(tmp_path, scenario):
    return run_ranks("_ddp_fail_worker.py", tmp_path, scenario, timeout=120)


def test_an_error_on_one_rank_stops_every_rank_at_once(tmp_path):
    """Rank 1 meets a NaN under nan_policy="raise": rank 0 raises too, naming rank 1's error, instead of hanging."""
    r0, r1 = _failure_run(tmp_path, "raise")
    for rebatch in ("False", "True"):
        assert r1[rebatch]["error"] == "ValueError" and "non-finite" in r1[rebatch]["message"]
        assert r0[rebatch]["error"] == "RuntimeError"
        assert "another rank failed" in r0[rebatch]["message"] and "rank 1: ValueError: non-finite" in \
            r0[rebatch]["message"]
        assert r0[rebatch]["sizes"] == r1[rebatch]["sizes"]  # the same steps were taken before it


def test_a_rank_whose_first_batch_is_all_skipped_carries_on(tmp_path):
    r0, r1 = _failure_run(tmp_path, "skip_first")
    for rebatch in ("False", "True"):
        a, b = r0[rebatch], r1[rebatch]
        assert a["error"] is None and b["error"] is None, (a, b)
        assert a["sizes"] == b["sizes"] and a["same_params"] and b["same_params"]
        s = b["stats"]
        assert s["samples_skipped"] == 16 and s["samples_seen"] == 80
        assert s["samples_yielded"] + s["samples_dropped"] == s["samples_selected"] == 32  # nothing lost
