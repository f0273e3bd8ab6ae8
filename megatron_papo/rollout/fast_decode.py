"""What one generation call prepares so that its steps do only what a step needs.

``packed_linears``: for the duration of a call, every tensor-parallel linear layer of the language model
(``ColumnParallelLinear``, ``RowParallelLinear``: attention qkv / projection, MLP fc1 / fc2, the output layer)
multiplies with its weight prepacked once by the platform layer (``megatron_papo.platform.decode_accel``). The
layers' communication (megatron's own forward around the matmul) is unchanged, so any TP x PP layout works;
weights are re-packed on every call, because the trainer updates them between rollouts. Where the platform has
no prepacked path (a GPU, another build) the layers run unchanged.

Legend: s positions, b rows, k input features, n output features (this rank's shard).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_papo.platform.decode_accel import pack_linear, packed_linear


class _PackedImpl:
    """A layer's ``_forward_impl`` (megatron's matmul hook) on packed weights; weights are packed on first use
    (a tied output layer receives the embedding's weight at call time) and kept for the call."""

    def __init__(self, original, cache: dict, rows_hint: int):
        self.original, self.cache, self.rows_hint = original, cache, rows_hint

    def __call__(self, input, weight, bias=None, sequence_parallel=False, **kwargs):
        if sequence_parallel or torch.is_grad_enabled():  # a gathered input or a backward: megatron's own
            return self.original(input=input, weight=weight, bias=bias, sequence_parallel=sequence_parallel,
                                 **kwargs)
        if id(weight) not in self.cache:
            self.cache[id(weight)] = pack_linear(weight, self.rows_hint)
        packed = self.cache[id(weight)]
        if packed is None or packed.source is not weight:
            return self.original(input=input, weight=weight, bias=bias, sequence_parallel=False, **kwargs)
        return packed_linear(input, packed, bias)  # [s, b, k] -> [s, b, n]


@contextmanager
def packed_linears(language_model, rows_hint: int = 32, enabled: bool = True):
    """Run the language model's linear layers on prepacked weights inside the block (inference only)."""
    layers = [m for m in language_model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    probe = next(language_model.parameters())
    if not enabled or not layers or pack_linear(probe.new_zeros(1, 1), 1) is None:
        yield
        return
    cache: dict = {}
    for layer in layers:
        layer._forward_impl = _PackedImpl(type(layer)._forward_impl.__get__(layer), cache, rows_hint)
    try:
        yield
    finally:
        for layer in layers:
            del layer._forward_impl
        cache.clear()
