"""FSDP2 (``fully_shard``): 2 gloo processes on CPU, every strategy, even and uneven shards, ranks failing.

A sharded model's forward gathers its parameters from every rank, so every rank must run every scoring forward:
before the fix, uneven shards (64 vs 32 samples) left both ranks waiting until killed. The worker runs under a
timeout, which turns such a hang into a failure.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from conftest import need, run_ranks  # noqa: E402

need("sklearn")
pytestmark = [pytest.mark.slow,  # multi-process: python -m pytest -q -m slow (CI runs it)
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return run_ranks("_fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), timeout=420)


def test_ranks_take_the_same_steps_and_stay_identical(fsdp):
    r0, r1 = fsdp
    for cfg, a, b in zip(r0["configs"], r0["results"], r1["results"]):
        assert a["sizes"] == b["sizes"] and sum(map(len, a["sizes"])) > 0, cfg
        assert a["same_params_as_rank0"] and b["same_params_as_rank0"], cfg


def test_uneven_shards_are_padded_and_accounted(fsdp):
    r0, r1 = fsdp
    for cfg, a, b in zip(r0["configs"], r0["results"], r1["results"]):
        for rank, res in enumerate((a, b)):
            s = res["stats"]
            assert s["samples_seen"] == 2 * (320 if rank == 0 or not cfg["uneven"] else 128), cfg
            assert s["samples_seen"] == s["samples_selected"] + s["samples_not_selected"] + s["samples_skipped"]
        if cfg["uneven"]:
            assert b["stats"]["samples_padded"] > 0, cfg


def test_scores_of_the_sharded_model_are_the_unsharded_ones(fsdp):
    assert fsdp[0]["score_diff"] < 1e-5 and fsdp[1]["score_diff"] < 1e-5


def test_a_rank_failing_stops_every_rank_in_the_same_round(fsdp):
    r0, r1 = fsdp
    loader0, loader1 = r0["failures"]["loader"], r1["failures"]["loader"]
    assert loader1["error"] == "OSError" and "disk error at batch 1" in loader1["message"]
    assert loader0["error"] == "RuntimeError" and "another rank failed" in loader0["message"]
    assert "disk error" in loader0["message"] and loader0["steps"] == loader1["steps"]
    nan0, nan1 = r0["failures"]["nan"], r1["failures"]["nan"]
    assert nan1["error"] == "ValueError" and "non-finite" in nan1["message"]
    assert nan0["error"] == "RuntimeError" and nan0["steps"] == nan1["steps"]


def test_sharded_models_are_detected_and_one_process_needs_no_agreement():
    import torch
    from torch import nn

    import sbsampler as sb
    from sbsampler.distributed import is_sharded

    plain = nn.Sequential(nn.Linear(4, 3))
    assert not is_sharded(plain)
    plain[0].weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its parameters with
    assert is_sharded(plain)
    loader = sb.SelectiveLoader([(torch.randn(8, 4), torch.arange(8) % 3)], sb.ScoringHook(nn.Linear(4, 3)), "sb",
                                sharded=True)
    assert loader.sharded is False  # one process: every "collective" answers itself
    with pytest.raises(TypeError, match="sharded must be None or a bool"):
        sb.SelectiveLoader([], sb.ScoringHook(nn.Linear(4, 3)), sharded="yes")
