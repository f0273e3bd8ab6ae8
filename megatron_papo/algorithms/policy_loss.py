"""Policy losses by name. ``papo`` covers GRPO, DAPO, PAPO-G and PAPO-D: the coefficients decide which terms act.

Legend: B = sequences in the micro-batch, T = response tokens (padded); every per-token tensor is [B, T] and only
positions where ``response_mask`` is set count. Per token (docs/algorithm.md section 1)::

    r       = exp(clamp(logp - old_logp, -20, 20))
    pg      = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),  capped at -A C where A < 0 (dual clip)
    loss_t  = pg * pg_mask + beta k3(logp, ref_logp) - gamma KL_prcp + eta1 (-logp) + eta2 (-mask_logp)

with ``KL_prcp = k3(logp, mask_logp)`` (or the exact full-vocabulary KL passed in ``perception_kl``); the
perception term is *maximised* (subtracted). ``mask_logp`` is detached unless ``cfg.perception_grad``.
``pg_mask`` (VPPO's token filter, a consumer's output) is 1 everywhere when not given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_papo.algorithms.aggregation import Aggregation, aggregate
from megatron_papo.algorithms.kl import k3_kl
from megatron_papo.config import AlgorithmConfig
from megatron_papo.registry import Registry

Tensor = torch.Tensor


@dataclass
class PolicyLossInputs:
    # [B, T] log-prob of the sampled tokens under the current policy (with gradient)
    logp: Tensor
    # [B, T] the same under the weights that generated the rollouts (no gradient)
    old_logp: Tensor
    # [B, T] advantage of the response, the same on each of its tokens
    advantages: Tensor
    # [B, T] bool or 0/1: which positions are response tokens
    response_mask: Tensor
    # [B, T] frozen reference policy's log-probs (needed when beta > 0)
    ref_logp: Optional[Tensor] = None
    # [B, T] log-probs with the masked image (needed when gamma > 0 with the k3 estimate, or eta2 > 0)
    mask_logp: Optional[Tensor] = None
    # [B, T] exact per-token KL(pi(.|I) || pi(.|I_mask)) (needed when cfg.exact_perception_kl)
    perception_kl: Optional[Tensor] = None
    # [B, T] full-vocabulary entropy of the policy, for the metrics only
    entropy: Optional[Tensor] = None
    # [B, T] 0/1: tokens that keep the policy-gradient term (VPPO's token filter; None: all)
    pg_mask: Optional[Tensor] = None


PolicyLossFn = Callable[[PolicyLossInputs, AlgorithmConfig, Aggregation], tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("loss", "algorithm.policy_loss")
register_policy_loss = POLICY_LOSSES.register   # decorator: make a policy loss available by name
get_policy_loss = POLICY_LOSSES.get


def dual_clip_pg(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                 clip_c: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with dual clip, per token [B, T]; also the per-token clip indicators."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_max = torch.maximum(pg1, pg2)
    pg3 = -adv * clip_c
    pg = torch.where(adv < 0, torch.minimum(pg_max, pg3), pg_max)
    clipped = pg1 < pg2                                                   # the clipped branch is active
    flags = {
        "pg_clipfrac": clipped,                                          # low + high (the reference's clipfrac)
        "pg_clipfrac_low": clipped & (adv < 0),                          # r < 1 - eps_low on a negative advantage
        "pg_clipfrac_high": clipped & (adv > 0),                         # r > 1 + eps_high on a positive advantage
        "pg_dualclip_frac": (adv < 0) & (pg_max > pg3),                  # -A r exceeded -A C
        "ppo_kl": -log_ratio.detach(),
        "ratio": ratio.detach(),
    }
    return pg, flags


def _check_shapes(inp: PolicyLossInputs) -> None:
    shape = inp.logp.shape
    for name, t in vars(inp).items():
        if t is not None and t.shape != shape:
            raise ValueError(f"PolicyLossInputs.{name} has shape {tuple(t.shape)} but logp has {tuple(shape)}; "
                             "every per-token input must be [B, T] (broadcast advantages with "
                             "broadcast_to_tokens)")


def _zero_padding(inp: PolicyLossInputs, mask: Tensor) -> PolicyLossInputs:
    # padded positions may hold -inf/NaN log-probs; selecting them away (not multiplying by 0) keeps both the
    # loss and the gradient finite, and the gradient there exactly 0
    def clean(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else torch.where(mask, t, torch.zeros_like(t))
    return PolicyLossInputs(**{k: clean(v) if k != "response_mask" else v for k, v in vars(inp).items()})


def _require(x: Optional[Tensor], what: str, why: str) -> Tensor:
    if x is None:
        raise ValueError(f"PolicyLossInputs.{what} is needed because {why}; compute it in the trainer or set "
                         "the coefficient to 0")
    return x


@register_policy_loss("papo")
def papo_policy_loss(inp: PolicyLossInputs, cfg: AlgorithmConfig,
                     agg: Aggregation) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO/DAPO surrogate + reference k3 KL + Implicit Perception Loss + Double Entropy Loss.

    Returns ``(loss, metrics)``: ``loss`` is the scalar to back-propagate for this micro-batch (see
    :mod:`aggregation` for its scale); ``metrics`` maps names to detached 0-dim sums over the micro-batch's
    response tokens, plus the counts ``num_tokens`` and ``num_seqs`` (reduce them with ``reduce_metrics``).
    """
    _check_shapes(inp)
    mask = inp.response_mask.bool()
    inp = _zero_padding(inp, mask)
    logp = inp.logp
    pg, flags = dual_clip_pg(logp, inp.old_logp, inp.advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c)
    if inp.pg_mask is not None:
        pg = pg * inp.pg_mask.detach()                                     # filtered tokens: no policy gradient
    total = pg
    terms: dict[str, Tensor] = {"pg_loss": pg, "nll": -logp}
    if cfg.beta > 0:
        _require(inp.ref_logp, "ref_logp", f"algorithm.beta={cfg.beta} > 0")
    if inp.ref_logp is not None:
        terms["ref_kl"] = k3_kl(logp, inp.ref_logp)
        if cfg.beta > 0:
            total = total + cfg.beta * terms["ref_kl"]
    mask_logp = inp.mask_logp
    if mask_logp is not None and not cfg.perception_grad:
        mask_logp = mask_logp.detach()                                    # default: a constant target per RL step
    if cfg.exact_perception_kl and inp.perception_kl is not None:
        terms["perception_kl"] = inp.perception_kl
    elif not cfg.exact_perception_kl and mask_logp is not None:
        terms["perception_kl"] = k3_kl(logp, mask_logp)
    if cfg.gamma > 0:
        if "perception_kl" not in terms:
            _require(None, "perception_kl" if cfg.exact_perception_kl else "mask_logp",
                     f"algorithm.gamma={cfg.gamma} > 0 (exact_perception_kl={cfg.exact_perception_kl})")
        total = total - cfg.gamma * terms["perception_kl"]               # maximised: the policy must use the image
    if cfg.eta1 > 0:
        total = total + cfg.eta1 * (-logp)
    if mask_logp is not None:
        terms["mask_nll"] = -mask_logp
    if cfg.eta2 > 0:
        total = total + cfg.eta2 * -_require(mask_logp, "mask_logp", f"algorithm.eta2={cfg.eta2} > 0")
    if inp.entropy is not None:
        terms["entropy"] = inp.entropy
    loss = aggregate(total, mask, agg)
    metrics = _token_sums({"loss": total, **terms, **flags}, mask, logp.dtype)
    metrics["num_tokens"] = mask.sum().to(metrics["loss"].dtype)
    metrics["num_seqs"] = mask.any(-1).sum().to(metrics["loss"].dtype)
    return loss, metrics


def _token_sums(values: dict[str, Tensor], mask: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    out = {}
    for name, v in values.items():
        v = v.detach().to(dtype)
        out[name] = torch.where(mask, v, torch.zeros_like(v)).sum()
    return out
