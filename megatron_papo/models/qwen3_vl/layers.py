"""Qwen3-VL layer specs and the two pieces megatron-core does not have: interleaved M-RoPE and DeepStack layers.

- Language layers: the shared GPT layer spec (``models.common.specs``) with per-head RMSNorm on q and k
  (``qk_layernorm``); no QKV bias comes from the config.
- ``InterleavedMRoPE``: megatron's ``MultimodalRotaryEmbedding`` assigns the rotary frequencies to
  (temporal, height, width) in contiguous chunks (Qwen2-VL); Qwen3-VL interleaves them, frequency j going to
  height when j % 3 == 1 and j < 3 * section[1], to width when j % 3 == 2 and j < 3 * section[2], to time
  otherwise. The rotation itself is the usual rotate-half, so megatron's ``apply_rotary_pos_emb`` applies it.
- ``DeepstackTransformerLayer``: a decoder layer that adds its DeepStack visual features (zero outside image
  tokens) to its output. The features ride in megatron's ``context`` argument, which the transformer block hands
  to every layer and through activation recomputation, so recompute sees the same features as the forward.
  Which layers are deepstack layers is decided by the block's per-layer spec list at build time.

Legend: s sequence, b batch, h hidden, hd head dim, K deepstack features held by this stage.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_papo.models.common.specs import block_norm, language_layer_spec


class InterleavedMRoPE(MultimodalRotaryEmbedding):
    """Rotary table [s, b, 1, hd] for position ids [3, b, s] with Qwen3-VL's interleaved section layout."""

    def __init__(self, kv_channels: int, rotary_base: float):
        torch.nn.Module.__init__(self)  # megatron's constructor places inv_freq with torch.cuda; forward moves it
        self.rotary_interleaved = False
        self.inv_freq = 1.0 / (rotary_base ** (torch.arange(0, kv_channels, 2, dtype=torch.float32) / kv_channels))

    def forward(self, position_ids: torch.Tensor, mrope_section, cp_group=None) -> torch.Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise ValueError("interleaved M-RoPE does not support context parallelism; set context parallel to 1")
        inv = self.inv_freq.to(position_ids.device)  # [hd/2]
        freqs = position_ids.float()[..., None] * inv  # [3, b, s, hd/2]
        j = torch.arange(inv.numel(), device=inv.device)
        axis = torch.zeros_like(j)
        axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
        picked = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]  # [b, s, hd/2]
        emb = torch.cat([picked, picked], dim=-1)  # [b, s, hd]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, hd]


class DeepstackTransformerLayer(TransformerLayer):
    """``TransformerLayer`` + ``context[deepstack_slot]`` ([s, b, h], zero off image tokens) added to its output."""

    def __init__(self, *args, deepstack_slot: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.deepstack_slot = deepstack_slot

    def forward(self, *args, **kwargs):
        hidden, context = super().forward(*args, **kwargs)
        if context is not None:  # [K, s, b, h]; None on text-only decode steps
            hidden = hidden + context[self.deepstack_slot].to(hidden.dtype)
        return hidden, context


def language_block_spec(transformer_impl: str, global_layers: range, slot_offset: int,
                        num_deepstack: int) -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs: global layer j < num_deepstack adds feature slot j - slot_offset."""
    base = language_layer_spec(transformer_impl, qk_layernorm=True)
    specs = []
    for j in global_layers:
        if j < num_deepstack:
            ds = copy.copy(base)
            ds.module, ds.params = DeepstackTransformerLayer, {**(base.params or {}), "deepstack_slot": j - slot_offset}
            specs.append(ds)
        else:
            specs.append(base)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=block_norm())
