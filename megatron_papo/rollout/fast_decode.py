"""What one generation call prepares so that its steps do only what a step needs.

``packed_linears``: for the duration of a call, every tensor-parallel linear layer of the language model
(``ColumnParallelLinear``, ``RowParallelLinear``: attention qkv / projection, MLP fc1 / fc2, the output layer)
multiplies with its weight prepacked once by the platform layer (``megatron_papo.platform.decode_accel``). The
layers' communication (megatron's own forward around the matmul) is unchanged, so any TP x PP layout works;
weights are re-packed on every call, because the trainer updates them between rollouts. Where the platform has
no prepacked path (a GPU, another build) the layers run unchanged. At tensor-parallel size 1 megatron's forward
around the matmul only passes the input through one-rank regions (identities, ~25 us of Python a call, 33
calls a decode step), so there the layer's whole ``forward`` is replaced by the packed matmul and its bias.

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


class _PackedForward:
    """A tensor-parallel size 1 layer's ``forward`` on packed weights: megatron's outputs ``(output, bias)``
    with the same arithmetic (column layers add their bias inside the matmul, row layers after it)."""

    def __init__(self, layer, impl: _PackedImpl):
        self.layer, self.impl, self.row = layer, impl, isinstance(layer, RowParallelLinear)

    def __call__(self, input_, weight=None, runtime_gather_output=None):
        layer = self.layer
        if torch.is_grad_enabled():
            kwargs = {} if self.row else dict(weight=weight, runtime_gather_output=runtime_gather_output)
            return type(layer).forward(layer, input_, **kwargs)
        skip = layer.skip_bias_add
        if self.row:
            out = self.impl(input_, layer.weight)
            if not skip and layer.bias is not None:
                out = out + layer.bias
        else:
            out = self.impl(input_, layer.weight if weight is None else weight, None if skip else layer.bias)
        return out, (layer.bias if skip else None)


def _single_rank(layer) -> bool:
    group = getattr(layer, "tp_group", None)
    return (group is not None and group.size() == 1 and not layer.sequence_parallel
            and not getattr(layer, "explicit_expert_comm", False))


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
        if _single_rank(layer):
            layer.forward = _PackedForward(layer, layer._forward_impl)
    try:
        yield
    finally:
        for layer in layers:
            del layer._forward_impl
            layer.__dict__.pop("forward", None)
        cache.clear()
