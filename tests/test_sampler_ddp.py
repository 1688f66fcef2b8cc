"""Sampler-level selection across ranks (issue 24): 2 gloo processes, a DDP model, a store shared by merge or per step.

Every rank draws the same plan from the same store and loads its own shard of it (DistributedSampler's padding),
so the ranks take the same steps, their shards together are the plan a single process draws from that store, the
parameters stay identical, and a run stopped mid-epoch and restored finishes exactly as the straight run.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from conftest import need, run_ranks  # noqa: E402

need("sklearn")
pytestmark = [pytest.mark.slow,  # multi-process: python -m pytest -q -m slow (CI runs it)
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks("_sampler_ddp_worker.py", tmp_path_factory.mktemp("sampler_ddp"))


def test_every_rank_draws_the_plan_a_single_process_draws_and_loads_its_share(runs):
    r0, r1 = runs
    for cfg, a, b in zip(r0["configs"], r0["results"], r1["results"]):
        for e, (ea, eb) in enumerate(zip(a["epochs"], b["epochs"])):
            assert ea["plan"] == eb["plan"] == ea["single_plan"], (cfg, e)
            assert set(ea["shard"]) | set(eb["shard"]) == set(ea["plan"]), (cfg, e)
            assert len(ea["shard"]) == len(eb["shard"]) == -(-len(ea["plan"]) // 2), (cfg, e)  # padded to equal
            assert ea["steps"] == eb["steps"] > 0, (cfg, e)
            assert ea["same_params"] and eb["same_params"], (cfg, e)
            assert ea["store_loss"] == eb["store_loss"], (cfg, e)  # the same store on both ranks
        assert len(a["epochs"][2]["plan"]) < 400, cfg  # later epochs prune


def test_a_run_restored_mid_epoch_finishes_as_the_straight_run(runs):
    r0, r1 = runs
    for cfg, straight, again, rank_straight in zip(r0["configs"], r0["results"], r0["resumed"], r1["results"]):
        assert again["final"] == straight["final"], cfg
        assert again["rest"] + 3 == straight["epochs"][1]["steps"], cfg
        assert rank_straight["final"] == straight["final"], cfg
