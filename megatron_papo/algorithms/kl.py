"""Per-token KL estimates between two policies from tokens sampled by the first (all shapes [B, T])."""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's low-variance "k3" estimate of KL(pi_a || pi_b) on tokens sampled from pi_a.

    ``d = clamp(b - a, -20, 20)``; ``k3 = clamp(exp(d) - d - 1, -10, 10)`` (the reference's clamps: the first
    keeps exp finite, the second bounds the gradient of rare tokens). logp = a, other_logp = b, both [B, T].
    """
    d = (other_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
