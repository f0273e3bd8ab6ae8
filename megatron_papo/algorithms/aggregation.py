"""How per-token loss values [B, T] of one micro-batch become the scalar that is back-propagated.

Each mode defines the micro-batch's *contribution* so that summing the contributions of every micro-batch on
every data-parallel (DP) rank gives the intended objective of the optimizer batch:

- ``token-mean`` (default): sum over this micro-batch's response tokens / ``global_tokens`` (the response tokens
  of the whole optimizer batch: all micro-batches on all DP ranks). The sum over micro-batches and ranks is the
  true global token-mean, independent of how the batch is split.
- ``seq-mean-token-mean`` (the paper's formula): each sequence's token-mean, summed / ``global_sequences``.
- ``microbatch-token-mean`` (the reference implementation): this micro-batch's token-mean /
  (``num_micro_batches`` * ``dp_size``): the mean over micro-batches and ranks of per-micro-batch token-means.

The returned loss is the contribution times ``grad_scale``. Megatron's ``forward_backward_func`` divides a
``loss_func``'s loss by the number of micro-batches, and megatron's DDP *averages* gradients over DP ranks; with
``framework_averages=True`` (the default) ``grad_scale = num_micro_batches * dp_size`` undoes both, so the final
gradient equals the gradient of the objective above. With ``framework_averages=False`` (a caller that sums
micro-batch gradients and all-reduces with SUM) ``grad_scale = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_papo.platform.device import device

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "microbatch-token-mean")


@dataclass(frozen=True)
class Aggregation:
    # token-mean | seq-mean-token-mean | microbatch-token-mean (see the module docstring)
    mode: str = "token-mean"
    # response tokens of the whole optimizer batch, all micro-batches on all DP ranks (token-mean)
    global_tokens: float = 0.0
    # sequences with at least one response token in the whole optimizer batch (seq-mean-token-mean)
    global_sequences: float = 0.0
    # micro-batches per DP rank in this optimizer step
    num_micro_batches: int = 1
    # data-parallel ranks that share the optimizer batch
    dp_size: int = 1
    # the backward divides by num_micro_batches and averages over DP ranks (megatron schedule + DDP)
    framework_averages: bool = True

    def __post_init__(self):
        if self.mode not in AGGREGATION_MODES:
            raise ValueError(f"algorithm.loss_agg: unknown mode {self.mode!r}; choose one of "
                             f"{', '.join(AGGREGATION_MODES)}")
        if self.mode == "token-mean" and self.global_tokens <= 0:
            raise ValueError("token-mean aggregation needs global_tokens > 0: pass the number of response tokens "
                             "of the whole optimizer batch (see count_global_tokens)")
        if self.mode == "seq-mean-token-mean" and self.global_sequences <= 0:
            raise ValueError("seq-mean-token-mean aggregation needs global_sequences > 0: pass the number of "
                             "sequences of the whole optimizer batch (see count_global_tokens)")
        if self.num_micro_batches < 1 or self.dp_size < 1:
            raise ValueError("Aggregation.num_micro_batches and dp_size must be >= 1")

    @property
    def grad_scale(self) -> float:
        return float(self.num_micro_batches * self.dp_size) if self.framework_averages else 1.0


def aggregate(values: torch.Tensor, response_mask: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """values [B, T], response_mask [B, T] (bool or 0/1) -> scalar loss to back-propagate (see module doc)."""
    mask = response_mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))          # where, not *: NaN outside stays out
    if agg.mode == "token-mean":
        contribution = masked.sum() / agg.global_tokens
    elif agg.mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)                # [B]; empty rows contribute 0
        contribution = per_seq.sum() / agg.global_sequences
    else:
        contribution = masked.sum() / mask.sum().clamp(min=1) / (agg.num_micro_batches * agg.dp_size)
    return contribution * agg.grad_scale


def count_global_tokens(response_masks: list[torch.Tensor], group=None) -> tuple[float, float]:
    """(response tokens, non-empty sequences) of one optimizer batch, summed over this rank's micro-batches
    (``response_masks``, each [B, T]) and over the DP ``group`` (None: no reduction, a single rank)."""
    # counts live on the masks' device: the collective backend (gloo on CPU, or the GPU one) needs them there
    dev = response_masks[0].device if response_masks else device()
    counts = torch.zeros(2, dtype=torch.float64, device=dev)
    for m in response_masks:
        m = m.bool()
        counts += torch.stack([m.sum(), m.any(-1).sum()]).to(counts)
    if group is not None and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return float(counts[0]), float(counts[1])
