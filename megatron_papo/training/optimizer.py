"""Megatron DDP + megatron's optimizer + LR schedule, and an optimizer step that skips non-finite gradients.

The policy is wrapped in ``megatron.core.distributed.DistributedDataParallel`` (gradients accumulate in its
contiguous fp32 buffers and are reduced over the data-parallel group by ``finalize_model_grads``), the optimizer
is ``get_megatron_optimizer`` (AdamW with decoupled weight decay, gradient clipping, and on a GPU the distributed
optimizer that shards its state over DP), the schedule is megatron's ``OptimizerParamScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_papo.config import OptimizerConfig
from megatron_papo.platform import has_gpu


def distributed_optimizer_enabled(cfg: OptimizerConfig) -> bool:
    # megatron-core 0.16.1's distributed optimizer type-checks accelerator tensors; on CPU the plain one is used
    return cfg.use_distributed_optimizer and has_gpu()


def wrap_ddp(model: torch.nn.Module, cfg: OptimizerConfig) -> DistributedDataParallel:
    """Wrap one model chunk in megatron DDP and make the schedules finalise (reduce) its grads."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer_enabled(cfg),
        overlap_grad_reduce=False, check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    # the pipeline schedules call this after the last micro-batch: DP all-reduce, tied-embedding sync across PP
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(cfg: OptimizerConfig, model_chunks: list, total_steps: int, params_dtype=torch.float32):
    """megatron optimizer + LR scheduler over DDP-wrapped ``model_chunks``; ``total_steps`` optimizer steps."""
    mcfg = MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=0.0, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
        use_distributed_optimizer=distributed_optimizer_enabled(cfg), params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
    )
    optimizer = get_megatron_optimizer(mcfg, model_chunks)
    decay_steps = max(int(total_steps), cfg.warmup_steps + 1, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=0.0,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=cfg.schedule,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


@dataclass
class StepResult:
    # the update was applied (False: non-finite gradients, step skipped)
    applied: bool
    # global gradient norm before clipping (nan when skipped)
    grad_norm: float
    # learning rate used for this step
    lr: float


def _grads_finite(model_chunks: list) -> bool:
    """All gradients of all chunks finite, agreed over every rank (one collective)."""
    bad = torch.zeros(1, dtype=torch.float32, device=next(model_chunks[0].parameters()).device)
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None and not torch.isfinite(g).all():
                bad.fill_(1.0)
                break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def optimizer_step(optimizer, scheduler, model_chunks: list) -> StepResult:
    """Clip, step and advance the schedule; skip the update (and zero grads) if any gradient is not finite."""
    lr = optimizer.param_groups[0]["lr"]
    if not _grads_finite(model_chunks):
        zero_grads(optimizer, model_chunks)
        return StepResult(False, float("nan"), lr)
    applied, grad_norm, _ = optimizer.step()
    if applied:
        scheduler.step(increment=1)
    return StepResult(bool(applied), float(grad_norm) if grad_norm is not None else float("nan"), lr)


def zero_grads(optimizer, model_chunks: list) -> None:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
