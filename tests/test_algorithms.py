"""PAPO loss terms, advantages, dynamic sampling, presets and the collapse detector against hand-computed float64
values (docs/algorithm.md sections 1 and 3)."""

import math

import pytest
import torch

from megatron_papo.algorithms import (Aggregation, CollapseDetector, PolicyLossInputs, algorithm_preset,
                                      broadcast_to_tokens, dynamic_sampling_filter, get_advantage_estimator,
                                      get_policy_loss, group_ids_for, k3_kl)

F64 = torch.float64


def _cfg(**kw):
    base = dict(eps_low=0.2, eps_high=0.3, dual_clip_c=3.0, beta=0.0, gamma=0.0, eta1=0.0, eta2=0.0)
    return algorithm_preset("grpo", **{**base, **kw})


def _row(*vals):
    return torch.tensor([list(vals)], dtype=F64)


def _loss(cfg, logp, old, adv, mask=None, **kw):
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    agg = Aggregation(global_tokens=float(mask.sum()))
    return get_policy_loss("papo")(PolicyLossInputs(logp, old, adv, mask, **kw), cfg, agg)


# --- PPO dual-clip surrogate ----------------------------------------------------------------------------------
def test_dual_clip_hand_values():
    # token: (A, logp - old_logp) -> expected pg, by hand with eps_low 0.2, eps_high 0.3, C 3
    cases = [
        (1.0, math.log(1.5), -1.3, "high"),        # r = 1.5 > 1.3: clipped at 1.3
        (1.0, math.log(1.1), -1.1, None),          # inside the trust region
        (-1.0, math.log(0.5), 0.8, "low"),         # r = 0.5 < 0.8 with A < 0: clipped at 0.8
        (-1.0, 2.0, 3.0, "dual"),                  # -A r = e^2 = 7.39 > C = 3: dual clip caps at 3
        (-1.0, math.log(2.9), 2.9, None),          # -A r = 2.9 < 3: no dual clip, no clip (r > 1 + eps_high
                                                   # but A < 0 so max picks the unclipped -A r)
        (2.0, 25.0, -2.6, "high"),                 # log-ratio clamped at 20, then clipped: -2 * 1.3
        (-0.5, -25.0, 0.4, "low"),                 # log-ratio clamped at -20: r = e^-20 -> clip 0.8 * 0.5
        (0.0, 1.0, 0.0, None),                     # zero advantage: no loss, no clip
    ]
    adv = _row(*[c[0] for c in cases])
    old = torch.zeros_like(adv)
    logp = _row(*[c[1] for c in cases]).requires_grad_()
    loss, m = _loss(_cfg(), logp, old, adv)
    expected = sum(c[2] for c in cases) / len(cases)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["pg_loss"].item() == pytest.approx(sum(c[2] for c in cases), abs=1e-12)
    assert m["pg_clipfrac_high"].item() == sum(c[3] == "high" for c in cases)
    assert m["pg_clipfrac_low"].item() == sum(c[3] == "low" for c in cases)
    assert m["pg_dualclip_frac"].item() == sum(c[3] == "dual" for c in cases)
    loss.backward()
    # gradient flows only through the unclipped tokens: d(-A r)/dlogp = -A r
    grad = logp.grad[0] * len(cases)
    for i, (a, lr, _, clip) in enumerate(cases):
        want = 0.0 if clip or a == 0 else -a * math.exp(lr)
        assert grad[i].item() == pytest.approx(want, abs=1e-12), i


# --- k3 KL ----------------------------------------------------------------------------------------------------
def test_k3_hand_values_and_clamps():
    a = _row(0.0, 0.0, 0.0, 0.0, 0.0).requires_grad_()
    b = _row(math.log(2.0), math.log(0.5), 0.0, 30.0, -30.0)
    k = k3_kl(a, b)[0]
    assert k[0].item() == pytest.approx(2.0 - math.log(2.0) - 1.0, abs=1e-14)      # 0.30685
    assert k[1].item() == pytest.approx(0.5 + math.log(2.0) - 1.0, abs=1e-14)      # 0.19315
    assert k[2].item() == 0.0
    assert k[3].item() == 10.0                          # d clamped to 20, e^20 - 21 clamped to 10
    assert k[4].item() == 10.0                          # d clamped to -20, 19 + e^-20 clamped to 10
    k.sum().backward()
    g = a.grad[0]
    assert g[0].item() == pytest.approx(1.0 - 2.0, abs=1e-14)   # dk3/da = 1 - e^d
    assert g[1].item() == pytest.approx(1.0 - 0.5, abs=1e-14)
    assert g[3].item() == 0.0 and g[4].item() == 0.0             # beyond the clamps: no gradient


def test_k3_clamp_edge_exactly_inside():
    # d = 3: e^3 - 4 = 16.09 > 10 -> clamped; d = 2: e^2 - 3 = 4.389 kept
    k = k3_kl(_row(0.0, 0.0), _row(3.0, 2.0))[0]
    assert k[0].item() == 10.0
    assert k[1].item() == pytest.approx(math.exp(2) - 3, abs=1e-14)


def test_reference_kl_term():
    cfg = _cfg(beta=0.01)
    logp, ref = _row(0.0, math.log(0.5)), _row(math.log(2.0), math.log(0.5))
    adv = torch.zeros_like(logp)
    loss, m = _loss(cfg, logp, logp.detach(), adv, ref_logp=ref)
    assert loss.item() == pytest.approx(0.01 * (2.0 - math.log(2.0) - 1.0) / 2, abs=1e-15)
    assert m["ref_kl"].item() == pytest.approx(2.0 - math.log(2.0) - 1.0, abs=1e-14)
    with pytest.raises(ValueError, match="ref_logp"):
        _loss(cfg, logp, logp, adv)


# --- Implicit Perception Loss ---------------------------------------------------------------------------------
def test_perception_term_is_maximised():
    gamma = 0.02
    cfg = _cfg(gamma=gamma)
    logp = _row(math.log(0.5)).requires_grad_()
    mask_logp = _row(math.log(0.25))                    # d = log 0.5; k3 = 0.5 + log 2 - 1 = 0.19315
    adv = torch.zeros_like(logp)
    loss, m = _loss(cfg, logp, logp.detach(), adv, mask_logp=mask_logp)
    k3 = 0.5 + math.log(2.0) - 1.0
    assert loss.item() == pytest.approx(-gamma * k3, abs=1e-15)       # subtracted from the loss
    assert m["perception_kl"].item() == pytest.approx(k3, abs=1e-14)
    assert m["mask_nll"].item() == pytest.approx(math.log(4.0), abs=1e-14)
    loss.backward()
    # d(-gamma k3)/dlogp = -gamma (1 - e^d) = -0.01: a descent step raises logp, pushing it away from the
    # masked policy, so the perception KL grows
    assert logp.grad.item() == pytest.approx(-gamma * 0.5, abs=1e-15)
    with torch.no_grad():
        stepped = logp - 1.0 * logp.grad
    assert k3_kl(stepped, mask_logp).item() > k3


def test_stop_gradient_flows_only_through_logp():
    cfg = _cfg(gamma=0.02, eta1=0.03, eta2=0.03)
    logp = _row(-1.0, -2.0).requires_grad_()
    mask_logp = _row(-1.5, -0.5).requires_grad_()       # even if the caller hands one with grad
    loss, _ = _loss(cfg, logp, logp.detach(), torch.zeros_like(logp), mask_logp=mask_logp)
    loss.backward()
    assert mask_logp.grad is None
    d = torch.tensor([-0.5, 1.5], dtype=F64)
    want = (-0.02 * (1 - torch.exp(d)) - 0.03) / 2        # perception + eta1 (-logp); eta2 has no gradient
    assert torch.allclose(logp.grad[0], want, atol=1e-15)


def test_perception_grad_variant_and_double_entropy():
    cfg = _cfg(gamma=0.02, eta1=0.03, eta2=0.05, perception_grad=True)
    logp = _row(-1.0, -2.0).requires_grad_()
    mask_logp = _row(-1.5, -0.5).requires_grad_()
    loss, m = _loss(cfg, logp, logp.detach(), torch.zeros_like(logp), mask_logp=mask_logp)
    d = torch.tensor([-0.5, 1.5], dtype=F64)
    k3 = torch.exp(d) - d - 1
    want_loss = (-0.02 * k3 + 0.03 * torch.tensor([1.0, 2.0], dtype=F64) + 0.05 * torch.tensor([1.5, 0.5],
                                                                                             dtype=F64)).mean()
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-15)
    loss.backward()
    # d/d mask_logp: -gamma (e^d - 1) (from k3) - eta2
    assert torch.allclose(mask_logp.grad[0], (-0.02 * (torch.exp(d) - 1) - 0.05) / 2, atol=1e-15)
    assert m["nll"].item() == pytest.approx(3.0) and m["mask_nll"].item() == pytest.approx(2.0)


def test_exact_perception_kl_replaces_k3():
    cfg = _cfg(gamma=0.5, exact_perception_kl=True)
    logp = _row(-1.0, -1.0)
    exact = _row(0.2, 0.4).requires_grad_()
    loss, m = _loss(cfg, logp, logp, torch.zeros_like(logp), mask_logp=_row(-9.0, -9.0), perception_kl=exact)
    assert loss.item() == pytest.approx(-0.5 * 0.3, abs=1e-15)
    assert m["perception_kl"].item() == pytest.approx(0.6)
    loss.backward()
    assert torch.allclose(exact.grad, torch.full_like(exact, -0.25))
    with pytest.raises(ValueError, match="perception_kl"):
        _loss(cfg, logp, logp, torch.zeros_like(logp), mask_logp=logp)


def test_missing_inputs_and_bad_shapes_raise():
    logp = _row(-1.0, -1.0)
    with pytest.raises(ValueError, match="mask_logp"):
        _loss(_cfg(gamma=0.01), logp, logp, torch.zeros_like(logp))
    with pytest.raises(ValueError, match="mask_logp"):
        _loss(_cfg(eta2=0.01), logp, logp, torch.zeros_like(logp))
    with pytest.raises(ValueError, match="advantages"):
        _loss(_cfg(), logp, logp, torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match="unknown loss"):
        get_policy_loss("nope")


def test_full_papo_g_objective_against_scalar_reference():
    """Every term at once, random values, against a plain-Python per-token evaluation of docs/algorithm.md section 1."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 7
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=F64) * 0.4
    ref = logp + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    msk = logp + torch.randn(B, T, generator=g, dtype=F64) * 2.0
    adv = broadcast_to_tokens(torch.tensor([1.2, -0.7, 0.3], dtype=F64), torch.ones(B, T)).to(F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    cfg = algorithm_preset("papo_g", eta1=0.05, eta2=0.05)
    loss, _ = _loss(cfg, logp, old, adv, mask=mask, ref_logp=ref, mask_logp=msk)

    def k3(a, b):
        d = min(max(b - a, -20.0), 20.0)
        return min(max(math.exp(d) - d - 1, -10.0), 10.0)

    total, count = 0.0, 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            lp, A = logp[i, t].item(), adv[i, t].item()
            r = math.exp(min(max(lp - old[i, t].item(), -20.0), 20.0))
            pg = max(-A * r, -A * min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high))
            if A < 0:
                pg = min(pg, -A * cfg.dual_clip_c)
            total += (pg + cfg.beta * k3(lp, ref[i, t].item()) - cfg.gamma * k3(lp, msk[i, t].item())
                      - cfg.eta1 * lp - cfg.eta2 * msk[i, t].item())
            count += 1
    assert loss.item() == pytest.approx(total / count, abs=1e-12)


def test_padding_with_inf_and_nan_stays_finite():
    cfg = algorithm_preset("papo_d")
    mask = torch.tensor([[True, True, False]])
    logp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, 0.0]], dtype=F64)
    msk = torch.tensor([[-1.5, -2.5, -float("inf")]], dtype=F64)
    adv = torch.tensor([[0.5, 0.5, float("nan")]], dtype=F64)
    loss, m = _loss(cfg, logp, old, adv, mask=mask, mask_logp=msk)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    clean, _ = _loss(cfg, logp[:, :2].detach(), old[:, :2], adv[:, :2], mask_logp=msk[:, :2])
    assert loss.item() == pytest.approx(clean.item(), abs=1e-15)


# --- advantages and dynamic sampling --------------------------------------------------------------------------
def test_grpo_advantages_match_loop_reference():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([7, 3, 7, 3, 9, 9, 7, 3, 9, 9])            # groups interleaved, arbitrary ids
    rewards = torch.rand(10, generator=g)
    adv = get_advantage_estimator("grpo")(rewards, ids)
    for gid in ids.unique():
        sel = ids == gid
        r = rewards[sel].double()
        want = (r - r.mean()) / (r.std(unbiased=True) + 1e-6)
        assert torch.allclose(adv[sel].double(), want, atol=1e-6)
    same = get_advantage_estimator("grpo")(torch.ones(4), group_ids_for(2, 2))
    assert torch.all(same == 0)                                     # identical rewards: no signal, no NaN
    with pytest.raises(ValueError, match="rollout.n"):
        get_advantage_estimator("grpo")(torch.ones(3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="unknown estimator"):
        get_advantage_estimator("ppo-gae")


def test_group_ids_and_broadcast():
    assert group_ids_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_dynamic_sampling_filter_strict_interval():
    acc = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float32)
    ids = group_ids_for(5, 3)                       # means: 0, 1, 2/3, 1/3, 0
    res = dynamic_sampling_filter(acc, ids)
    assert res.keep.tolist() == [False] * 6 + [True] * 6 + [False] * 3
    assert (res.kept_groups, res.dropped_groups) == (2, 3)
    edge = dynamic_sampling_filter(torch.tensor([0.0, 1.0, 0.0, 0.0]), group_ids_for(2, 2), low=0.0, high=0.5)
    assert edge.keep.tolist() == [False, False, False, False]       # mean 0.5 == high and 0.0 == low: dropped
    with pytest.raises(ValueError, match="dynamic_sampling"):
        dynamic_sampling_filter(acc, ids, low=0.9, high=0.1)


# --- presets --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,eps_high,beta,gamma,eta,dyn", [
    ("grpo", 0.3, 0.01, 0.0, 0.0, False), ("papo_g", 0.3, 0.01, 0.02, 0.0, False),
    ("dapo", 0.28, 0.0, 0.0, 0.0, True), ("papo_d", 0.28, 0.0, 0.01, 0.03, True)])
def test_presets_match_published_table(name, eps_high, beta, gamma, eta, dyn):
    cfg = algorithm_preset(name)
    assert (cfg.eps_low, cfg.eps_high, cfg.dual_clip_c) == (0.2, eps_high, 3.0)
    assert (cfg.beta, cfg.gamma, cfg.eta1, cfg.eta2, cfg.dynamic_sampling) == (beta, gamma, eta, eta, dyn)
    assert cfg.advantage == "grpo" and cfg.policy_loss == "papo" and cfg.loss_agg == "token-mean"
    assert algorithm_preset(name, gamma=0.5).gamma == 0.5
    with pytest.raises(ValueError):
        algorithm_preset(name, gama=0.5)


# --- collapse detector ----------------------------------------------------------------------------------------
def _step(kl, clip, nll, mnll):
    return {"perception_kl": kl, "pg_clipfrac": clip, "nll": nll, "mask_nll": mnll}


def test_collapse_detector_healthy_run_is_quiet():
    det = CollapseDetector(window=3)
    g = torch.Generator().manual_seed(0)
    for s in range(40):
        noise = torch.rand(4, generator=g).tolist()
        assert det.update(_step(0.03 + 0.01 * noise[0], 0.002 + 0.001 * noise[1], 0.4 + 0.05 * noise[2],
                                0.6 + 0.05 * noise[3]), step=s) is None


def test_collapse_detector_fires_when_all_rise_together():
    det = CollapseDetector(window=3)
    msgs = [det.update(_step(0.03 * 1.5 ** s, 0.002 * 1.3 ** s, 0.4 * 1.1 ** s, 0.6 * 1.1 ** s), step=s)
            for s in range(10)]
    first = next(i for i, m in enumerate(msgs) if m)
    assert 5 <= first <= 8                                # after two windows, once KL is past the 0.1 floor
    assert "perception_kl" in msgs[first] and f"step {first}" in msgs[first]


def test_collapse_detector_needs_all_signals():
    det = CollapseDetector(window=3)
    # perception KL climbs (below the alarm level) but clip fraction and NLLs stay flat: not the collapse pattern
    assert all(det.update(_step(0.05 * 1.3 ** s, 0.002, 0.4, 0.6)) is None for s in range(9))
    # a perception KL near 1 warns on its own
    assert det.update(_step(0.9, 0.002, 0.4, 0.6)) is not None
    # metrics without a perception term (plain GRPO) are ignored
    assert CollapseDetector().update({"pg_clipfrac": 0.1}) is None
