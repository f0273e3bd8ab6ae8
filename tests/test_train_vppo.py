"""VPPO end to end on the tiny VLM: TP=2 and PP=2 match TP=1; the token filter and the shaping change the update;
an extra scored view changes nothing but the metrics it adds.

Same set-up as tests/test_train.py (shared initial weights, layout-independent sampling, a deterministic reward
with variance). The weights are scaled up (sharper logits, image features that matter) so the visual
dependencies are far apart (the top-p token choice must not hinge on float rounding between layouts). Dynamic sampling is off to keep
the run short; the rest is the ``vppo`` preset.
"""

from __future__ import annotations

import math

import pytest
import torch

from multirank import run_multirank
from test_train import _build, _params, _rl_steps

VPPO = ("algorithm.preset=vppo", "algorithm.dynamic_sampling=false", "rollout.recompute_old_logprobs=true")
SHARPEN = 6.0
KEYS = ("actor/loss", "actor/pg_loss", "actor/nll", "actor/grad_norm", "vppo/token_fraction", "vppo/scale",
        "vppo/threshold", "vppo/dependency", "views/masked/k3")


def _run(root: str, init: str, *sets: str) -> dict:
    run = _build(root, init, *VPPO, *sets)
    model = run.ctx.policy.module
    with torch.no_grad():                                    # sharper logits, image features that matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
        if model.vision is not None:                         # the first pipeline stage holds the vision tower
            model.vision.merger.linear_fc2.weight.mul_(50.0)
            model.vision.merger.linear_fc2.bias.mul_(50.0)
    before = _params(run)
    metrics = _rl_steps(run)
    after = _params(run)
    change = max((after[k] - before[k]).abs().max().item() for k in before)
    return {"metrics": metrics, "change": change, "weights": after}


def _reference_stats_packed(root: str, init: str) -> dict:
    """``vppo_stats=reference`` with packing: the micro-batches the consumer is given (``StepLayout``) and the
    rows of each micro-batch the update's schedule runs, two optimizer steps of 4 rows per RL step."""
    import megatron_papo.training.rl_step as m

    seen, apply, schedule = {"layout": [], "update": []}, m.apply_consumers, m.run_schedule

    def apply_spy(a, tokens, view_logp, layout, *rest):
        seen["layout"].append(layout.micro_batch_rows)
        return apply(a, tokens, view_logp, layout, *rest)

    def schedule_spy(model, mbs, loss_fn, *, forward_only, **kw):
        seen["update"].append([mb.row_index.tolist() for mb in mbs])
        return schedule(model, mbs, loss_fn, forward_only=forward_only, **kw)

    m.apply_consumers, m.run_schedule = apply_spy, schedule_spy
    try:
        _run(root, init, "algorithm.vppo_stats=reference", "training.max_tokens_per_micro_batch=300",
             "training.prefix_scoring=false", "training.prompts_per_update=1", "training.micro_batch_size=2")
    finally:
        m.apply_consumers, m.run_schedule = apply, schedule
    return seen


def _single_body(rank, world, root, init):
    out = {"tp1": _run(root, init), "no_consumer": _run(root, init, "algorithm.consumers=[]"),
           "extra_view": _run(root, init, "algorithm.views=[masked,blank]"),
           "reference_packed": _reference_stats_packed(root, init)}
    out["extra_view"]["weights"] = None
    return out


def _two_body(rank, world, root, init):
    res = {"tp2": _run(root, init, "parallel.tensor_model_parallel_size=2"),
           "pp2": _run(root, init, "parallel.pipeline_model_parallel_size=2")}
    for r in res.values():
        r["weights"] = None
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("vppo")
    init = str(root / "init")
    single = run_multirank(_single_body, 1, args=(str(root), init), timeout=300)[0]
    two = run_multirank(_two_body, 2, args=(str(root), init), timeout=300)
    return single, two


def _close(a: dict, b: dict, what: str, keys=KEYS):
    assert a["reward/mean"] == b["reward/mean"], f"{what}: different rollouts"
    for k in keys:
        assert math.isclose(a[k], b[k], rel_tol=2e-3, abs_tol=1e-6), f"{what}: {k} {a[k]} vs {b[k]}"


def test_vppo_tp2_and_pp2_match_tp1(results):
    single, two = results
    ref = single["tp1"]
    assert ref["change"] > 1e-5
    for m in ref["metrics"]:
        assert 0.4 <= m["vppo/token_fraction"] < 0.75, m    # ceil(0.4 |o|) of 6-token responses: 0.5
        assert abs(m["vppo/scale"] - 1.0) < 1e-6             # s_max makes the mean scale exactly 1
        assert m["vppo/dependency"] > 1e-4 and m["views/masked/k3"] > 1e-4
        assert 0 < m["reward/mean"] < 1
    for layout in ("tp2", "pp2"):
        for rank, per_rank in enumerate(two):
            res = per_rank[layout]
            assert res["change"] > 1e-5, f"{layout} rank {rank}: weights did not change"
            if layout == "tp2" or rank == 1:                 # loss metrics live on the last pipeline stage
                for step, (a, b) in enumerate(zip(ref["metrics"], res["metrics"])):
                    _close(a, b, f"{layout} rank {rank} step {step + 1}")


def test_reference_stats_follow_the_packed_micro_batches(results):
    seen = results[0]["reference_packed"]
    assert len(seen["layout"]) == 2 and len(seen["update"]) == 4         # 2 RL steps x 2 optimizer steps
    for step, layout in enumerate(seen["layout"]):
        first, second = seen["update"][2 * step: 2 * step + 2]
        assert layout == first + [[4 + i for i in rows] for rows in second]
        assert layout != [[0, 1], [2, 3], [4, 5], [6, 7]]                 # not micro_batch_size rows


def test_filter_and_shaping_change_the_update(results):
    single, _ = results
    plain, vppo = single["no_consumer"], single["tp1"]
    assert "vppo/scale" not in plain["metrics"][0]
    assert plain["metrics"][0]["reward/mean"] == vppo["metrics"][0]["reward/mean"]
    assert not all(torch.equal(plain["weights"][k], vppo["weights"][k]) for k in vppo["weights"])


def test_extra_view_adds_metrics_and_changes_nothing_else(results):
    single, _ = results
    for a, b in zip(single["tp1"]["metrics"], single["extra_view"]["metrics"]):
        _close(a, b, "masked + blank views")
        assert "views/blank/k3" in b and "views/blank/k3" not in a
