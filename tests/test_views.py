"""Auxiliary views, per-token signals and the view consumers (PAPO, VPPO) against straightforward float64 loops.

VPPO's token filter and advantage shaping are checked on random inputs with ties, empty responses, all-equal
scores and p = 1; the global shaping statistics over two DP ranks equal those over the whole batch on one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from multirank import run_multirank

# ---------------------------------------------------------------- float64 references (one sample at a time)


def _k3_ref(a: float, b: float) -> float:
    d = min(max(b - a, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)


def _filter_ref(score, mask, p):
    """Per row: positions sorted by (score descending, position), the first ceil(p * len) kept."""
    keep = torch.zeros(mask.shape, dtype=torch.bool)
    thresholds = []
    for i in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[i, t]]
        k = math.ceil(p * len(pos))
        chosen = sorted(pos, key=lambda t: (-float(score[i, t]), t))[:k]
        for t in chosen:
            keep[i, t] = True
        thresholds.append(float(score[i, chosen[-1]]) if chosen else None)
    return keep, thresholds


def _scale_ref(scores, valid, s_min, lo=None, hi=None, mean_rows=None):
    """scores/valid: lists; min/max over ``valid`` rows (or given), mean of normalised over ``mean_rows``."""
    vals = [s for s, v in zip(scores, valid) if v]
    out = [1.0] * len(scores)
    if len(vals) < 2:
        return out
    lo, hi = min(vals) if lo is None else lo, max(vals) if hi is None else hi
    if hi - lo <= 1e-6:
        return out
    norm = [min(max((s - lo) / (hi - lo), 0.0), 1.0) for s in scores]
    rows = range(len(scores)) if mean_rows is None else mean_rows
    picked = [norm[i] for i in rows if valid[i]]
    if not picked:
        return out
    mu = sum(picked) / len(picked)
    s_max = s_min + (1.0 - s_min) / (mu + 1e-8)
    for i in rows:
        if valid[i]:
            out[i] = s_min + norm[i] * (s_max - s_min)
    return out


def _inputs(seed: int, n: int = 12, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (n, t), generator=g).double() / 2          # few values: many ties
    lengths = torch.randint(0, t + 1, (n,), generator=g)
    lengths[0], lengths[1] = 0, t                                          # an empty and a full response
    mask = torch.arange(t)[None] < lengths[:, None]
    return score, mask


# ---------------------------------------------------------------- VPPO


@pytest.mark.parametrize("p", [0.4, 0.25, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_filter_equals_per_sample_loop(p, seed):
    from megatron_papo.algorithms.consumers.vppo import top_fraction_mask

    score, mask = _inputs(seed)
    keep, threshold, k = top_fraction_mask(score, mask, p)
    ref_keep, ref_thr = _filter_ref(score, mask, p)
    assert torch.equal(keep, ref_keep)
    assert k.tolist() == [math.ceil(p * int(m.sum())) for m in mask]
    for i, thr in enumerate(ref_thr):
        if thr is not None:
            assert float(threshold[i]) == thr
    if p == 1.0:
        assert torch.equal(keep, mask)


def test_token_filter_all_equal_scores_keeps_the_first_tokens():
    from megatron_papo.algorithms.consumers.vppo import top_fraction_mask

    mask = torch.tensor([[True] * 5 + [False] * 3])
    keep, _, _ = top_fraction_mask(torch.ones(1, 8), mask, 0.4)
    assert keep[0].tolist() == [True, True] + [False] * 6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_global_shaping_equals_per_sample_loop(seed):
    from megatron_papo.algorithms.consumers.vppo import global_shaping_scale, response_means

    g = torch.Generator().manual_seed(seed)
    dep, mask = _inputs(seed)
    dep = dep * torch.rand(dep.shape, generator=g, dtype=torch.float64)
    score = response_means(dep, mask)
    ref_scores = [sum(float(dep[i, t]) for t in range(dep.shape[1]) if mask[i, t]) / max(int(mask[i].sum()), 1)
                  for i in range(len(dep))]
    assert torch.allclose(score, torch.tensor(ref_scores, dtype=torch.float64), rtol=0, atol=1e-15)
    valid = mask.any(-1)
    scale = global_shaping_scale(score, valid, 0.9)
    ref = _scale_ref(ref_scores, valid.tolist(), 0.9)
    assert torch.allclose(scale, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert scale[0] == 1.0                                                  # the empty response
    assert abs(scale[valid].mean().item() - 1.0) < 1e-6                     # s_max makes the mean scale 1
    assert scale[valid].min().item() == pytest.approx(0.9)


def test_shaping_guards_all_equal_and_single_response():
    from megatron_papo.algorithms.consumers.vppo import global_shaping_scale

    same = torch.full((5,), 0.3, dtype=torch.float64)
    assert torch.equal(global_shaping_scale(same, torch.ones(5, dtype=torch.bool), 0.9), torch.ones(5).double())
    one = torch.tensor([0.1, 0.7], dtype=torch.float64)
    assert torch.equal(global_shaping_scale(one, torch.tensor([True, False]), 0.9), torch.ones(2).double())


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_shaping_equals_per_minibatch_loop(seed):
    from megatron_papo.algorithms.consumers import StepLayout
    from megatron_papo.algorithms.consumers.vppo import reference_shaping_scale

    g = torch.Generator().manual_seed(seed)
    score = torch.rand(16, generator=g, dtype=torch.float64)
    valid = torch.rand(16, generator=g) > 0.2
    scale = reference_shaping_scale(score, valid, 0.8, StepLayout(rows_per_update=8, micro_batch_size=3))
    ref = []
    for a in (0, 8):
        s, v = score[a:a + 8].tolist(), valid[a:a + 8].tolist()
        vals = [x for x, ok in zip(s, v) if ok]
        part = [1.0] * 8
        for b in range(0, 8, 3):                          # micro-batches: min/max of the mini-batch, their mean
            rows = list(range(b, min(b + 3, 8)))
            got = _scale_ref(s, v, 0.8, min(vals), max(vals), rows) if len(vals) >= 2 else [1.0] * 8
            for i in rows:
                part[i] = got[i]
        ref += part
    assert torch.allclose(scale, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_reference_shaping_takes_the_given_micro_batches():
    """Under packing the micro-batches are token-budget bins (``StepLayout.micro_batch_rows``): each bin's mean."""
    from megatron_papo.algorithms.consumers import StepLayout
    from megatron_papo.algorithms.consumers.vppo import reference_shaping_scale

    g = torch.Generator().manual_seed(3)
    score = torch.rand(8, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True, True, True, True])
    bins = [[2, 0, 5], [1, 4], [3], [6, 7]]                   # mini-batches 0..5 and 6..7
    scale = reference_shaping_scale(score, valid, 0.8, StepLayout(6, 3, micro_batch_rows=bins))
    s, v = score.tolist(), valid.tolist()
    ref = [1.0] * 8
    for a, b in ((0, 6), (6, 8)):
        vals = [x for x, ok in zip(s[a:b], v[a:b]) if ok]
        for rows in bins:
            if a <= rows[0] < b:
                got = _scale_ref(s, v, 0.8, min(vals), max(vals), rows)
                for i in rows:
                    ref[i] = got[i]
    assert torch.allclose(scale, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    rows_of_3 = reference_shaping_scale(score, valid, 0.8, StepLayout(6, 3))
    assert not torch.allclose(scale, rows_of_3)               # the split matters: the test can tell them apart


def _dp_body(rank, world, score, valid):
    import torch.distributed as dist

    from megatron_papo.algorithms.consumers.vppo import global_shaping_scale

    half = len(score) // 2
    part = slice(rank * half, (rank + 1) * half)
    return global_shaping_scale(score[part], valid[part], 0.9, dist.group.WORLD)


def test_global_shaping_over_two_dp_ranks_equals_one_rank():
    from megatron_papo.algorithms.consumers.vppo import global_shaping_scale

    g = torch.Generator().manual_seed(5)
    score = torch.rand(10, generator=g, dtype=torch.float64)
    valid = torch.rand(10, generator=g) > 0.3
    whole = global_shaping_scale(score, valid, 0.9)
    parts = run_multirank(_dp_body, 2, args=(score, valid))
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-14, atol=1e-14)


def test_vppo_consumer_outputs_and_metrics():
    from megatron_papo.algorithms import algorithm_preset
    from megatron_papo.algorithms.consumers import CONSUMERS, ConsumerInputs, StepLayout

    g = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 3
    view = old + torch.randn(6, 7, generator=g, dtype=torch.float64)
    _, mask = _inputs(3, 6, 7)
    cfg = algorithm_preset("vppo")
    out = CONSUMERS.get("vppo").fn(ConsumerInputs(old, {"masked": view}, mask, StepLayout(6, 2)), cfg)
    dep = [[min(max(_k3_ref(float(old[i, t]), float(view[i, t])), 0.0), 10.0) for t in range(7)] for i in range(6)]
    ref_keep, _ = _filter_ref(torch.tensor(dep), mask, 0.4)
    assert torch.equal(out.tokens["pg_mask"].bool(), ref_keep)
    scores = [sum(d for d, m in zip(dep[i], mask[i]) if m) / max(int(mask[i].sum()), 1) for i in range(6)]
    ref_scale = _scale_ref(scores, mask.any(-1).tolist(), 0.9)
    assert torch.allclose(out.advantage_scale.double(), torch.tensor(ref_scale, dtype=torch.float64), atol=1e-6)
    kept, total = out.metrics["vppo/token_fraction"]
    assert kept == ref_keep.sum() and total == mask.sum()


# ---------------------------------------------------------------- signals, PAPO consumer, policy loss


def test_signals_equal_float64_loops():
    from megatron_papo.algorithms import signals

    g = torch.Generator().manual_seed(0)
    a = -torch.rand(3, 5, generator=g) * 4
    b = a + torch.randn(3, 5, generator=g) * 3
    b[0, 0] = a[0, 0] + 30.0                                               # exercises both clamps
    ref = torch.tensor([[_k3_ref(float(x), float(y)) for x, y in zip(r, s)] for r, s in zip(a, b)],
                       dtype=torch.float64)
    assert torch.allclose(signals.k3(a, b).double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(signals.visual_dependency(a, b).double(), ref.clamp(0, 10), rtol=1e-5, atol=1e-6)
    assert torch.equal(signals.abs_delta_logp(a, b), (a - b).abs())
    la, lb = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    p, q = la.double().log_softmax(-1), lb.double().log_softmax(-1)
    assert torch.allclose(signals.exact_kl(la, lb).double(), (p.exp() * (p - q)).sum(-1), atol=1e-5)
    ent = lambda x: -(x.exp() * x).sum(-1)  # noqa: E731
    assert torch.allclose(signals.entropy_gap(ent(p), ent(q)), ent(q) - ent(p))


def test_papo_consumer_feeds_the_masked_logprobs():
    from megatron_papo.algorithms import algorithm_preset
    from megatron_papo.algorithms.consumers import CONSUMERS, ConsumerInputs, StepLayout

    old, view = torch.zeros(2, 3), torch.randn(2, 3)
    spec = CONSUMERS.get("papo")
    out = spec.fn(ConsumerInputs(old, {"masked": view}, torch.ones(2, 3, dtype=torch.bool), StepLayout(2, 2)),
                  algorithm_preset("papo_g"))
    assert out.tokens == {"mask_logp": view} and out.advantage_scale is None
    assert not spec.scored(algorithm_preset("papo_g", perception_grad=True))   # rides in the update instead


def test_pg_mask_filters_the_policy_gradient_but_not_the_mean():
    from megatron_papo.algorithms import Aggregation, PolicyLossInputs, algorithm_preset, get_policy_loss

    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(2, 4, generator=g)).requires_grad_()
    old, adv = logp.detach() - 0.05, torch.tensor([[1.0] * 4, [-0.5] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)
    cfg = algorithm_preset("vppo")
    loss, _ = get_policy_loss("papo")(PolicyLossInputs(logp, old, adv, mask, pg_mask=keep), cfg,
                                      Aggregation(global_tokens=7.0, framework_averages=False))
    loss.backward()
    ratio = (logp.detach() - old).exp().double()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))                 # no dual-clip case here
    ref = ((pg * keep + 0.06 * -logp.detach().double()) * mask).sum() / 7.0          # mean over all 7 tokens
    assert abs(loss.item() - ref.item()) < 1e-6
    grad_ref = ((-adv * ratio) * keep - 0.06) * mask / 7.0                           # no clipping active
    assert torch.allclose(logp.grad.double(), grad_ref, atol=1e-6)


# ---------------------------------------------------------------- views


class _Processor:
    """Deterministic stand-in with the real processor's contract: pixels -> ([P, D], grid [k, 3]), and the patch and
    merge sizes the masking cells default to."""

    patch_size, merge_size = 2, 1

    patch_size, merge_size = 14, 2

    def __call__(self, images):
        arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
        pv = torch.cat([torch.from_numpy(a).reshape(-1, 12) for a in arrs])
        return pv, torch.tensor([[1, a.shape[0] // 2, a.shape[1] // 2] for a in arrs])


def _request(n=3, prompt_index=4):
    from megatron_papo.algorithms.views import ViewRequest

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(1, 255, (8, 12, 3), dtype=np.uint8))
    pv, grid = _Processor()([img])
    return ViewRequest([img], pv, grid, prompt_index, n, seed=7, step=2)


def test_views_keep_the_grid_and_follow_their_definitions():
    from megatron_papo.algorithms import algorithm_preset
    from megatron_papo.algorithms.masking import mask_prompt_images
    from megatron_papo.algorithms.views import ViewRequest, make_views

    req, proc = _request(), _Processor()
    cfg = algorithm_preset("papo_g", mask_patch_size=2, noise_sigma=0.5)
    text_only = ViewRequest([], None, None, 5, 2, seed=7, step=2)
    views = make_views(["masked", "blank", "noise"], [req, text_only], cfg, proc)
    for name, rows in views.items():
        assert len(rows) == 5 and rows[3] == (None, None) and rows[4] == (None, None), name
        assert rows[0] is rows[1] is rows[2], f"{name}: one view per prompt, shared by its rows"
        assert torch.equal(rows[0][1], req.image_grid_thw)
    expected = proc(mask_prompt_images(req.images, seed=7, step=2, prompt_index=4, patch_size=2, ratio=0.6))[0]
    assert torch.equal(views["masked"][0][0], expected)
    assert torch.equal(views["blank"][0][0], torch.zeros_like(req.pixel_values))
    noise = views["noise"][0][0] - req.pixel_values
    assert 0.4 < noise.std().item() < 0.6
    again = make_views(["noise"], [req], cfg, proc)["noise"][0][0]
    assert torch.equal(again, views["noise"][0][0])                              # seeded


def test_view_per_response_draws_one_view_per_row():
    from megatron_papo.algorithms import algorithm_preset
    from megatron_papo.algorithms.views import make_views

    req = _request()
    cfg = algorithm_preset("papo_g", mask_patch_size=2, view_per_response=True)
    for name in ("masked", "noise"):
        rows = make_views([name], [req], cfg, _Processor())[name]
        assert not torch.equal(rows[0][0], rows[1][0]) and not torch.equal(rows[1][0], rows[2][0]), name


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("sets, match", [
    (["algorithm.views=[masked,fuzzy]"], "algorithm.views: unknown view 'fuzzy'"),
    (["algorithm.consumers=[papo,vpo]"], "algorithm.consumers: unknown consumer 'vpo'"),
    (["algorithm.preset=vppo", "algorithm.views=[blank]"], "vppo reads the view 'masked'"),
    (["algorithm.preset=vppo", "algorithm.vppo_view=dark"], "algorithm.vppo_view: unknown view"),
    (["algorithm.preset=papo_g", "algorithm.consumers=[vppo]"], "need the papo consumer"),
    (["algorithm.preset=vppo", "algorithm.vppo_token_fraction=0"], "vppo_token_fraction"),
    (["algorithm.vppo_stats=local"], "algorithm.vppo_stats"),
])
def test_bad_views_or_consumers_are_one_line_config_errors(sets, match):
    from megatron_papo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


def test_view_plan_from_presets_and_lists():
    from megatron_papo.algorithms.consumers import active_consumers, view_plan
    from megatron_papo.config import load_config

    plan = lambda *s: view_plan(load_config(None, list(s)).algorithm)  # noqa: E731
    assert plan("algorithm.preset=grpo").scored == ()
    assert plan("algorithm.preset=papo_g").scored == ("masked",)
    assert plan("algorithm.preset=vppo").scored == ("masked",)
    assert plan("algorithm.preset=vppo", "algorithm.views=[blank,masked]").scored == ("blank", "masked")
    grad = plan("algorithm.preset=papo_g", "algorithm.perception_grad=true")
    assert grad.scored == () and grad.in_update == "masked" and grad.generated == ("masked",)
    cfg = load_config(None, ["algorithm.preset=vppo"]).algorithm
    assert active_consumers(cfg) == ["vppo"] and cfg.eta1 == 0.06 and cfg.mask_ratio == 0.5
    assert (cfg.vppo_token_fraction, cfg.vppo_s_min, cfg.beta, cfg.dynamic_sampling) == (0.4, 0.9, 0.0, True)
