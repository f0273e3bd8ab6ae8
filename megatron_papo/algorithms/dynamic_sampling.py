"""DAPO dynamic sampling: drop prompt groups whose responses are all right or all wrong (zero advantage).

Legend: N = responses (prompt-major), G = groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_papo.algorithms.advantages import group_mean_std


@dataclass
class FilterResult:
    # [N] bool: responses of the groups that are kept
    keep: torch.Tensor
    # number of groups kept
    kept_groups: int
    # number of groups dropped (mean accuracy outside the open interval)
    dropped_groups: int


def dynamic_sampling_filter(accuracy: torch.Tensor, group_ids: torch.Tensor, low: float = 0.01,
                            high: float = 0.99) -> FilterResult:
    """Keep a group only if its mean accuracy is strictly inside ``(low, high)``.

    accuracy [N] float (per-response accuracy reward), group_ids [N] int -> FilterResult.
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"dynamic sampling bounds must satisfy 0 <= low < high <= 1, got {low} and {high}; "
                         "fix algorithm.dynamic_sampling_min/max")
    mean, _, _ = group_mean_std(accuracy, group_ids)                     # [N] group mean per response
    keep = (mean > low) & (mean < high)
    num_groups, first = _first_of_group(group_ids)
    kept_groups = int(keep[first].sum())
    return FilterResult(keep=keep, kept_groups=kept_groups, dropped_groups=num_groups - kept_groups)


def _first_of_group(group_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    pos = torch.arange(group_ids.numel(), device=group_ids.device)
    first = torch.full((uniq.numel(),), group_ids.numel(), dtype=torch.long, device=group_ids.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return uniq.numel(), first
