"""Exact reduction of the loss metrics over micro-batches and ranks, and the collapse ("KL_prcp hacking") detector.

The policy loss returns token sums plus the counts ``num_tokens`` / ``num_seqs``; summing those over micro-batches
and DP ranks and dividing once gives exact means whatever the split.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from megatron_papo.platform.device import device

COUNT_KEYS = ("num_tokens", "num_seqs")
logger = logging.getLogger(__name__)


def reduce_metrics(per_micro_batch: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Token means of every metric over this rank's micro-batches and the DP ``group`` (None: this rank only).

    Every rank must pass dicts with the same keys. Counts are returned as totals.
    """
    if not per_micro_batch:
        return {}
    keys = sorted(per_micro_batch[0])
    ref = per_micro_batch[0][keys[0]]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=ref.device)    # one collective for all metrics
    for m in per_micro_batch:
        if sorted(m) != keys:
            raise ValueError(f"metric keys differ between micro-batches: {sorted(m)} vs {keys}")
        sums += torch.stack([m[k].detach().to(torch.float64) for k in keys])
    if group is not None and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    totals = dict(zip(keys, sums.tolist()))
    tokens = max(totals.get("num_tokens", 0.0), 1.0)
    return {k: v if k in COUNT_KEYS else v / tokens for k, v in totals.items()}


def reduce_means(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], group=None) -> dict[str, float]:
    """Exact means of ``{name: (sum, count)}`` over the DP ``group`` (None: this rank only), one collective for all;
    a name with a zero total count gives 0. Every rank must pass the same names."""
    if not pairs:
        return {}
    keys = sorted(pairs)
    vals = torch.stack([torch.stack([pairs[k][0].detach().double().reshape(()),
                                     pairs[k][1].detach().double().reshape(())]) for k in keys])   # [K, 2]
    if group is not None and dist.is_initialized():
        vals = vals.to(device())                     # the collective backend's device (gloo: CPU)
        dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=group)
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in zip(keys, vals.tolist())}


class CollapseDetector:
    """Warns when perception KL, clip fraction and the NLLs of both policies rise together (docs/algorithm.md s.4).

    Feed it the reduced metrics of each RL step (keys ``perception_kl``, ``pg_clipfrac``, ``nll``, ``mask_nll``).
    It compares the mean of the last ``window`` steps with the mean of the ``window`` steps before: all four must
    have grown by at least ``rel_rise`` (relative) and the recent perception KL must exceed ``kl_floor`` (healthy
    runs stay near 0.02-0.05; collapsed ones reach ~1). A perception KL above ``kl_alarm`` warns on its own.
    """

    WATCHED = ("perception_kl", "pg_clipfrac", "nll", "mask_nll")

    def __init__(self, window: int = 5, rel_rise: float = 0.2, kl_floor: float = 0.1, kl_alarm: float = 0.5):
        if window < 1:
            raise ValueError(f"CollapseDetector window must be >= 1, got {window}")
        self.window, self.rel_rise, self.kl_floor, self.kl_alarm = window, rel_rise, kl_floor, kl_alarm
        self.history: deque[dict[str, float]] = deque(maxlen=2 * window)
        self.warnings = 0

    def update(self, metrics: dict[str, float], step: Optional[int] = None) -> Optional[str]:
        """Record one step; return (and log) a warning message when collapse signs move together, else None."""
        if any(k not in metrics or not math.isfinite(float(metrics[k])) for k in self.WATCHED):
            return None                                                # e.g. GRPO without the perception term
        self.history.append({k: float(metrics[k]) for k in self.WATCHED})
        msg = self._check()
        if msg is not None:
            self.warnings += 1
            msg = f"step {step}: {msg}" if step is not None else msg
            logger.info(msg)           # the run logger prints it (once); logging it too showed it twice
        return msg

    def _check(self) -> Optional[str]:
        last = self.history[-1]["perception_kl"]
        if last > self.kl_alarm:
            return (f"possible PAPO collapse (KL_prcp hacking): perception KL {last:.3f} > {self.kl_alarm}; "
                    "consider a smaller gamma, the double entropy loss or a reference KL")
        if len(self.history) < 2 * self.window:
            return None
        steps = list(self.history)
        before = {k: sum(s[k] for s in steps[:self.window]) / self.window for k in self.WATCHED}
        recent = {k: sum(s[k] for s in steps[self.window:]) / self.window for k in self.WATCHED}
        rising = all(recent[k] > before[k] * (1 + self.rel_rise) and recent[k] > before[k] for k in self.WATCHED)
        if rising and recent["perception_kl"] > self.kl_floor:
            moves = ", ".join(f"{k} {before[k]:.3g}->{recent[k]:.3g}" for k in self.WATCHED)
            return (f"possible PAPO collapse (KL_prcp hacking): {moves} rose together over the last "
                    f"{self.window} steps; consider a smaller gamma, the double entropy loss or a reference KL")
        return None
