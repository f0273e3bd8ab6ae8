"""Per-token signals that compare the real image with an auxiliary view (``views``), from the no-grad scoring pass.

All take and return ``[B, T]`` tensors aligned with the response mask (padded positions are unspecified); "policy"
is either the current policy (with gradient, inside the loss: PAPO) or the old one (the rollout's weights, no
gradient: VPPO).

- :func:`k3`: Schulman's k3 estimate of KL(pi(.|I) || pi(.|view)) on the sampled token, the reference's clamps.
- :func:`visual_dependency`: k3 against the old policy clamped to [0, 10] (VPPO's token visual dependency).
- :func:`abs_delta_logp`: |log pi(o_t | I) - log pi(o_t | view)|.
- :func:`exact_kl`: the exact full-vocabulary KL(pi(.|I) || pi(.|view)) per token, from both logits (vocab-parallel
  shards, needs the view's logits: only where the view rides in the update forward).
- :func:`entropy_gap`: H(pi(.|view)) - H(pi(.|I)), full-vocabulary entropies.

:func:`view_signal_sums` gives each view's per-token mean signals as (sum, count) pairs for the metrics.
"""

from __future__ import annotations

import torch

from megatron_papo.algorithms.kl import k3_kl
from megatron_papo.ops import vocab_parallel_kl

Tensor = torch.Tensor


def k3(policy_logp: Tensor, view_logp: Tensor) -> Tensor:
    """k3 estimate of KL(pi(.|I) || pi(.|view)) from tokens sampled with the real image: [B, T]."""
    return k3_kl(policy_logp, view_logp)


def visual_dependency(old_logp: Tensor, view_logp: Tensor) -> Tensor:
    """VPPO's visual dependency of each token: k3 between the old policy's log-probs with the real image and with
    the view, clamped to [0, 10]: [B, T]."""
    return k3(old_logp, view_logp).clamp(0.0, 10.0)


def abs_delta_logp(policy_logp: Tensor, view_logp: Tensor) -> Tensor:
    """|log-prob with the real image - log-prob with the view| of the sampled token: [B, T]."""
    return (policy_logp - view_logp).abs()


def exact_kl(real_logits: Tensor, view_logits: Tensor, group=None, temperature: float = 1.0) -> Tensor:
    """Exact KL(pi(.|I) || pi(.|view)) over the full vocabulary: logits [B, T, V/tp] -> [B, T]."""
    return vocab_parallel_kl(real_logits, view_logits, group=group, temperature=temperature)


def entropy_gap(real_entropy: Tensor, view_entropy: Tensor) -> Tensor:
    """How much less certain the policy is with the view than with the real image: [B, T]."""
    return view_entropy - real_entropy


def view_signal_sums(name: str, old_logp: Tensor, view_logp: Tensor, mask: Tensor) -> dict:
    """``{"views/<name>/k3": (sum, count), "views/<name>/abs_dlogp": ...}`` over the response tokens (old policy)."""
    mask = mask.bool()
    count = mask.sum().double()
    out = {}
    for signal, fn in (("k3", k3), ("abs_dlogp", abs_delta_logp)):
        v = fn(old_logp, view_logp)
        out[f"views/{name}/{signal}"] = (torch.where(mask, v, torch.zeros_like(v)).double().sum(), count)
    return out
