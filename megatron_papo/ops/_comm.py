"""The tensor-parallel group the vocab-parallel ops reduce over, and their two collectives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """A resolved tensor-parallel group: ``size == 1`` means no communication at all."""

    group: object | None
    size: int
    rank: int

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


def resolve_tp_group(group=None) -> TPGroup:
    """``group`` if given; else megatron's current tensor-parallel group; else (nothing initialised) TP=1.

    The last case lets the ops run in a plain single process (tests, notebooks, tools) with ``group=None``.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return TPGroup(None, 1, 0)
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return TPGroup(None, 1, 0)
        group = parallel_state.get_tensor_model_parallel_group()
    return TPGroup(group, dist.get_world_size(group), dist.get_rank(group))
