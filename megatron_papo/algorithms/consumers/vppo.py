"""VPPO (Visually-Perceptive Policy Optimization, arXiv 2510.09285): token filter and advantage shaping from the
visual dependency of each token.

Visual dependency of token t: ``dep_t = clamp(k3(old_logp_t, view_logp_t), 0, 10)`` (``signals``), old policy,
real image against the view (``algorithm.vppo_view``, the masked image by default).

- Token-level gradient filtering: per response keep the policy-gradient term on its top ``ceil(p * |o|)`` tokens by
  dependency (``p = algorithm.vppo_token_fraction``; ties go to the earlier token) and zero it elsewhere. The
  loss is still averaged over all response tokens (as the reference does): the other terms (entropy penalty, KLs)
  stay on every token.
- Trajectory-level advantage shaping: per response ``S = mean_t dep_t``; ``norm = clamp((S - min) / (max - min),
  0, 1)``; ``scale = s_min + norm * (s_max - s_min)`` with ``s_max = s_min + (1 - s_min) / (mean(norm) + 1e-8)``,
  multiplied into the advantage. Empty responses keep scale 1, and so does everything when fewer than two
  responses are non-empty or ``max - min <= 1e-6`` (the reference's guards).
  ``algorithm.vppo_stats=global`` (default): min, max and mean over every non-empty response of the RL step on all
  DP ranks. ``reference``: as the reference code, min/max over this rank's rows of each optimizer step
  (mini-batch) and the mean over each micro-batch's rows (it then depends on the parallel layout and the split);
  the micro-batches are those the schedule runs (under packing, the token-budget bins, not row counts).

Legend: N responses on this DP rank, T padded response length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_papo.algorithms.consumers import ConsumerInputs, ConsumerOutput, StepLayout, register_consumer
from megatron_papo.algorithms.signals import visual_dependency
from megatron_papo.platform.device import device

Tensor = torch.Tensor
_RANGE_EPS, _MEAN_EPS = 1e-6, 1e-8          # the reference's guards


def top_fraction_mask(score: Tensor, mask: Tensor, fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the top ``ceil(fraction * row tokens)`` masked positions by ``score`` (ties: earlier first).

    score [N, T], mask [N, T] bool -> (keep [N, T] bool, threshold [N]: the smallest kept score, k [N] int64).
    """
    mask = mask.bool()
    k = torch.ceil(mask.sum(-1).double() * fraction).long()                     # [N]
    s = torch.where(mask, score, torch.full_like(score, float("-inf")))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices           # [N, T]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1]).expand_as(order).contiguous())
    keep = (rank < k[:, None]) & mask
    sorted_s = s.gather(1, order)
    threshold = sorted_s.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
    return keep, threshold, k


def response_means(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over the masked positions, float64 [N] (0 for an empty row)."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).double().sum(-1)
    return total / mask.sum(-1).clamp(min=1).double()


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is None or not dist.is_initialized():
        return t
    out = t.to(device())
    dist.all_reduce(out, op=op, group=group)
    return out.to(t.device)


def _map(score: Tensor, valid: Tensor, lo: Tensor, hi: Tensor, mu: Tensor, s_min: float) -> Tensor:
    norm = ((score - lo) / (hi - lo)).clamp(0.0, 1.0)
    s_max = s_min + (1.0 - s_min) / (mu + _MEAN_EPS)
    return torch.where(valid, s_min + norm * (s_max - s_min), torch.ones_like(score))


def global_shaping_scale(score: Tensor, valid: Tensor, s_min: float, group=None) -> Tensor:
    """score [N] float64, valid [N] bool -> scale [N] float64 from min/max/mean over all DP ranks' valid rows."""
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    ext = torch.stack([torch.where(valid, score, inf).min() if len(score) else inf,
                       torch.where(valid, -score, inf).min() if len(score) else inf])
    ext = _all_reduce(ext, dist.ReduceOp.MIN, group)                             # [min, -max]
    lo, hi = ext[0], -ext[1]
    count = _all_reduce(valid.sum().double().reshape(1), dist.ReduceOp.SUM, group)[0]
    if count < 2 or hi - lo <= _RANGE_EPS:
        return torch.ones_like(score)
    norm = ((score - lo) / (hi - lo)).clamp(0.0, 1.0)
    total = _all_reduce(torch.where(valid, norm, torch.zeros_like(norm)).sum().reshape(1), dist.ReduceOp.SUM, group)
    return _map(score, valid, lo, hi, total[0] / count, s_min)


def reference_shaping_scale(score: Tensor, valid: Tensor, s_min: float, layout: StepLayout) -> Tensor:
    """As the reference: min/max over this rank's rows of each mini-batch, mean over each micro-batch's rows."""
    scale = torch.ones_like(score)
    for a in range(0, len(score), layout.rows_per_update):
        mini = slice(a, min(a + layout.rows_per_update, len(score)))
        s, v = score[mini], valid[mini]
        if int(v.sum()) < 2:
            continue
        lo, hi = s[v].min(), s[v].max()
        if hi - lo <= _RANGE_EPS:
            continue
        for micro in _micro_batches(layout, mini):
            if bool(valid[micro].any()):
                mu = ((score[micro][valid[micro]] - lo) / (hi - lo)).clamp(0.0, 1.0).mean()
                scale[micro] = _map(score[micro], valid[micro], lo, hi, mu, s_min)
    return scale


def _micro_batches(layout: StepLayout, mini: slice) -> list[Tensor]:
    """Row indices of each micro-batch of mini-batch ``mini``: the schedule's own (``layout.micro_batch_rows``,
    e.g. token-budget bins under packing), or consecutive runs of ``micro_batch_size`` rows."""
    if layout.micro_batch_rows is None:
        return [torch.arange(b, min(b + layout.micro_batch_size, mini.stop))
                for b in range(mini.start, mini.stop, layout.micro_batch_size)]
    return [torch.tensor(rows) for rows in layout.micro_batch_rows if mini.start <= rows[0] < mini.stop]


def _pair(total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    return total.double().sum(), count.double().sum()


@register_consumer("vppo", view=lambda a: a.vppo_view)
def vppo_consumer(inp: ConsumerInputs, cfg) -> ConsumerOutput:
    """``pg_mask`` [N, T] (the kept tokens) and the advantage scale [N] from the view's visual dependency."""
    mask = inp.response_mask
    dep = visual_dependency(inp.old_logp, inp.views[cfg.vppo_view])             # [N, T]
    keep, threshold, k = top_fraction_mask(dep, mask, cfg.vppo_token_fraction)
    score, valid = response_means(dep, mask), mask.any(-1)                      # [N] float64, [N]
    if cfg.vppo_stats == "global":
        scale = global_shaping_scale(score, valid, cfg.vppo_s_min, inp.group)
    else:
        scale = reference_shaping_scale(score, valid, cfg.vppo_s_min, inp.layout)
    zero = torch.zeros_like(score)
    metrics = {"vppo/token_fraction": _pair(keep.sum(), mask.sum()),
               "vppo/threshold": _pair(torch.where(k > 0, threshold.double(), zero), valid.sum()),
               "vppo/dependency": _pair(torch.where(valid, score, zero), valid.sum()),
               "vppo/scale": _pair(torch.where(valid, scale, zero), valid.sum())}
    return ConsumerOutput(tokens={"pg_mask": keep.float()}, advantage_scale=scale.float(), metrics=metrics)
