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
    """Warns when a run drifts towards collapse; once per episode of each sign (docs/algorithm.md section 4).

    Feed it the reduced metrics of each RL step (keys ``perception_kl``, ``pg_clipfrac``, ``nll``, ``mask_nll``,
    ``ref_kl``, ``ppo_kl``; missing ones are skipped). Four signs, each warned once when it appears and again only
    after it has been absent for ``window`` steps (an episode):

    - **reference-KL rise**, the early one: the k3 KL from the frozen reference ``ref_kl`` above ``ref_kl_alarm``
      nats, or the mean of the last ``window`` steps ``ref_kl_growth`` times the mean of the ``window`` before and
      above ``ref_kl_floor``. Measured on CPU collapses of the tiny model (higher learning rate, large gamma:
      tests/data/collapse_traces.json) it rose to 2-6 nats while healthy runs stayed below ~0.15; it needs neither a
      perception term (works for GRPO) nor a moving clip fraction;
    - **perception KL alarm**: ``perception_kl`` above ``kl_alarm`` (healthy 0.02-0.05; collapsed ~1);
    - **joint rise**: perception KL, clip fraction and the NLLs of both policies all grew by ``rel_rise`` between
      the two windows and the recent perception KL exceeds ``kl_floor``; a signal that is zero in both windows
      (the clip fraction with one optimizer step per rollout batch) cannot move and is left out of the rule;
    - **sudden drift within a step**: the policy moved more than ``drift_ppo_kl`` nats (``ppo_kl``, the k1 KL of
      the rollout policy from the one being updated, over the step's optimizer updates) *and* the reference KL
      rose by more than ``drift_ref_kl_rise`` nats since the previous step. Measured on the 40 runs of the CPU
      experiment (docs/experiments, 4 optimizer updates per step, lr 3e-4): the PAPO-G run that broke in its last
      update (held-out accuracy 0.53 -> 0.26) had 0.049 and +0.134 in that step; among the 2,340 steps of the 39
      healthy runs either value was reached (ppo_kl up to 0.036, a rise up to +0.150), never both: the closest
      step had 0.017 with +0.046. With one update per step ``ppo_kl`` is 0 and the sign cannot fire.
    """

    WATCHED = ("perception_kl", "pg_clipfrac", "nll", "mask_nll")

    def __init__(self, window: int = 5, rel_rise: float = 0.2, kl_floor: float = 0.1, kl_alarm: float = 0.5,
                 ref_kl_alarm: float = 1.0, ref_kl_growth: float = 3.0, ref_kl_floor: float = 0.3,
                 drift_ppo_kl: float = 0.03, drift_ref_kl_rise: float = 0.08):
        if window < 1:
            raise ValueError(f"CollapseDetector window must be >= 1, got {window}")
        self.window, self.rel_rise, self.kl_floor, self.kl_alarm = window, rel_rise, kl_floor, kl_alarm
        self.ref_kl_alarm, self.ref_kl_growth, self.ref_kl_floor = ref_kl_alarm, ref_kl_growth, ref_kl_floor
        self.drift_ppo_kl, self.drift_ref_kl_rise = drift_ppo_kl, drift_ref_kl_rise
        self.history: deque[dict[str, float]] = deque(maxlen=2 * window)
        self.quiet: dict[str, int] = {}                 # sign -> steps since it was last present (absent: armed)
        self.warnings = 0
        self.new_signs: list[str] = []                  # the signs that started an episode at the last update

    def update(self, metrics: dict[str, float], step: Optional[int] = None) -> Optional[str]:
        """Record one step; return (and log) a warning when a sign starts an episode, else None."""
        keys = self.WATCHED + ("ref_kl", "ppo_kl")
        self.history.append({k: float(metrics[k]) for k in keys if k in metrics and math.isfinite(float(metrics[k]))})
        found = [(name, msg) for name, msg in ((n, rule()) for n, rule in self._rules()) if msg is not None]
        present = {name for name, _ in found}
        new = [msg for name, msg in found if name not in self.quiet]
        self.new_signs = [name for name, _ in found if name not in self.quiet]
        for name in list(self.quiet):
            self.quiet[name] = 0 if name in present else self.quiet[name] + 1
            if self.quiet[name] >= self.window:
                del self.quiet[name]                    # the episode is over: warn again if it comes back
        for name in present:
            self.quiet.setdefault(name, 0)
        if not new:
            return None
        self.warnings += 1
        msg = "; ".join(new) + "; consider a smaller gamma or learning rate, the double entropy loss or a reference KL"
        msg = f"step {step}: {msg}" if step is not None else msg
        logger.info(msg)           # the run logger prints it (once); logging it as a warning too showed it twice
        return msg

    def _rules(self):
        return (("ref_kl", self._ref_kl_rise), ("perception_alarm", self._perception_alarm),
                ("joint_rise", self._joint_rise), ("drift", self._sudden_drift))

    def _windows(self, key: str):
        """(mean of the older window, mean of the recent window) of ``key``, or None before two windows."""
        vals = [s.get(key) for s in self.history]
        if len(vals) < 2 * self.window or any(v is None for v in vals):
            return None
        return sum(vals[:self.window]) / self.window, sum(vals[self.window:]) / self.window

    def _ref_kl_rise(self) -> Optional[str]:
        last = self.history[-1].get("ref_kl")
        if last is None:
            return None
        if last > self.ref_kl_alarm:
            return f"possible collapse: reference KL {last:.3f} > {self.ref_kl_alarm} nats"
        w = self._windows("ref_kl")
        if w and w[1] > self.ref_kl_floor and w[1] > self.ref_kl_growth * w[0]:
            return f"possible collapse: reference KL rose {w[0]:.3g} -> {w[1]:.3g} over {self.window} steps"
        return None

    def _sudden_drift(self) -> Optional[str]:
        if len(self.history) < 2:
            return None
        now, before = self.history[-1], self.history[-2]
        if "ppo_kl" not in now or "ref_kl" not in now or "ref_kl" not in before:
            return None
        rise = now["ref_kl"] - before["ref_kl"]
        if now["ppo_kl"] > self.drift_ppo_kl and rise > self.drift_ref_kl_rise:
            return (f"possible break within this step: the policy moved {now['ppo_kl']:.3g} nats from the rollout "
                    f"policy in its updates and the reference KL rose {before['ref_kl']:.3g} -> {now['ref_kl']:.3g}"
                    "; validate this step's checkpoint before trusting it")
        return None

    def _perception_alarm(self) -> Optional[str]:
        last = self.history[-1].get("perception_kl")
        if last is not None and last > self.kl_alarm:
            return f"possible PAPO collapse (KL_prcp hacking): perception KL {last:.3f} > {self.kl_alarm}"
        return None

    def _joint_rise(self) -> Optional[str]:
        w = {k: self._windows(k) for k in self.WATCHED}
        if any(v is None for v in w.values()) or w["perception_kl"][1] <= self.kl_floor:
            return None
        moving = {k: v for k, v in w.items() if not (v[0] == 0.0 and v[1] == 0.0)}
        if all(recent > before * (1 + self.rel_rise) and recent > before for before, recent in moving.values()):
            moves = ", ".join(f"{k} {b:.3g}->{r:.3g}" for k, (b, r) in moving.items())
            return f"possible PAPO collapse (KL_prcp hacking): {moves} rose together over the last {self.window} steps"
        return None
