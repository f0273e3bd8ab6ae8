"""Outcome advantages, computed once per RL step from per-response scalar rewards.

Legend: N = responses in the step (prompt-major: prompt 0's n samples first), T = response tokens,
G = number of groups (prompts).
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_papo.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("estimator", "algorithm.advantage")
register_advantage = ADVANTAGE_ESTIMATORS.register   # decorator: make an estimator available by name
get_advantage_estimator = ADVANTAGE_ESTIMATORS.get


def group_ids_for(num_prompts: int, n: int, device=None) -> torch.Tensor:
    """Group id of every response of a prompt-major rollout batch: [0]*n + [1]*n + ... -> [N] int64."""
    return torch.arange(num_prompts, device=device).repeat_interleave(n)


def _dense_groups(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    # arbitrary ids (e.g. global prompt indices) -> 0..G-1, so scatter targets are compact
    uniq, dense = torch.unique(group_ids, return_inverse=True)
    return dense, uniq.numel()


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group mean, unbiased group std and group size, all [N] (vectorised, no loop over samples)."""
    dense, num_groups = _dense_groups(group_ids)
    v = values.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, dense, torch.ones_like(v))
    total = torch.zeros_like(count).index_add_(0, dense, v)
    mean = total / count                                                   # [G]
    sq = torch.zeros_like(count).index_add_(0, dense, (v - mean[dense]) ** 2)
    var = sq / (count - 1).clamp(min=1)                                    # unbiased (Bessel), as torch.std
    return mean[dense], var.sqrt()[dense], count[dense]


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage ``(R - mean_group) / (std_group + eps)`` with the unbiased std.

    rewards [N] float, group_ids [N] int (responses of one prompt share an id) -> advantages [N] float32.
    Every group needs at least 2 responses (a single sample has no unbiased std): ``rollout.n >= 2``.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    mean, std, count = group_mean_std(rewards, group_ids)
    if bool((count < 2).any()):
        raise ValueError("GRPO advantages need at least 2 responses per prompt; set rollout.n >= 2")
    return ((rewards.to(torch.float64) - mean) / (std + eps)).to(torch.float32)


def broadcast_to_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-response values [N] -> per-token [N, T], zero outside the response (the same value on every token)."""
    return values[:, None].to(torch.float32) * response_mask.to(torch.float32)
