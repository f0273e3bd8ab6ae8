"""Running a model built with sequence parallelism without it, on the same weights (inference forwards only).

Under sequence parallelism the activations between tensor-parallel blocks are split along the sequence across
the tensor-parallel ranks. A forward that cannot be split that way (the rollout engine decodes one token per row
and step) runs the same weights with it off (:func:`without_sequence_parallel`): megatron-core 0.16.1 reads the
choice at run time from the language model's ``TransformerConfig.sequence_parallel`` (the block's RNG fork, our
VLMs' scatter of the merged embeddings) and from each tensor-parallel linear's own ``sequence_parallel``
attribute (gather / reduce-scatter). With both off every rank holds the whole sequence and the forward is the
plain tensor-parallel one. Only forwards without gradient run that way: the norms' gradient all-reduce was fixed
when the model was built. Which models are built with it is the trainer's choice
(``training.sequence_parallel.model_sequence_parallel``).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


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
