"""Sequence parallelism (``parallel.sequence_parallel``): who uses it, and running without it on the same weights.

Under sequence parallelism the activations between tensor-parallel blocks (norms, residual adds, dropout) are
split along the sequence across the tensor-parallel ranks: column-parallel linears all-gather their input,
row-parallel linears reduce-scatter their output, and megatron's ``finalize_model_grads`` sums the norm weights'
gradients over the tensor-parallel group. It saves activation memory for the backward pass, so only the trained
policy is built with it; inference-only copies (the reference model, ``evaluate``, ``generate``) are not
(:func:`model_sequence_parallel`), which also lets a checkpoint trained with it load at any TP size.

The rollout engine decodes one token per row and step, which cannot be split over the sequence, so it runs the
policy's weights without sequence parallelism (:func:`without_sequence_parallel`): megatron-core 0.16.1 reads the
choice at run time from the language model's ``TransformerConfig.sequence_parallel`` (the block's RNG fork, our
VLMs' scatter of the merged embeddings) and from each tensor-parallel linear's own ``sequence_parallel``
attribute (gather / reduce-scatter). With both off every rank holds the whole sequence and the forward is the
plain tensor-parallel one. Only forwards without gradient run that way: the norms' gradient all-reduce was fixed
when the model was built. tests/test_sequence_parallel.py checks TP2 with = TP2 without through a real RL step.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def model_sequence_parallel(cfg, trainable: bool) -> bool:
    """Whether a model built for this run splits activations along the sequence (the trained policy only)."""
    return bool(trainable and cfg.parallel.sequence_parallel)


class _Switch:
    """The config objects and linears of ``model`` that run with sequence parallelism, collected once."""

    def __init__(self, model: torch.nn.Module):
        configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None),
                                                                 "sequence_parallel", False) is True}
        self.configs = list(configs.values())
        self.layers = [m for m in model.modules() if getattr(m, "sequence_parallel", None) is True]

    def __bool__(self) -> bool:
        return bool(self.configs or self.layers)

    def set(self, on: bool) -> None:
        for obj in self.configs + self.layers:
            obj.sequence_parallel = on


def without_sequence_parallel(model: torch.nn.Module, fn: Callable) -> Callable:
    """``fn`` (a forward of ``model`` without gradient) run with sequence parallelism off; ``fn`` itself when the
    model was built without it."""
    switch = _Switch(model)
    if not switch:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("a model built with sequence parallelism runs without it only under no_grad or "
                               "inference_mode (its norm-gradient reduction was fixed when it was built)")
        switch.set(False)
        try:
            return fn(*args, **kwargs)
        finally:
            switch.set(True)

    return run
