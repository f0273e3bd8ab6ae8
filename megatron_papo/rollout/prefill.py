"""The prefill's last decoder layer, computed where its output is read: each prompt's last position.

A prefill needs two things from the model: every layer's keys / values of every prompt position (the KV cache)
and the logits of each prompt's last position (its first sampled token). Layers before the last must run on
every position (their outputs feed the next layer's keys). The last layer's output feeds only the final norm
and the output layer, which read the last position alone (megatron materialises the last token's logits only).
So ``LastPositionLayer`` runs the last layer as two calls of megatron's own modules:

1. the positions before the last: input norm -> qkv -> (q / k norm) -> rotated keys / values into the cache
   (``RopeCachingSelfAttention.cache_key_value``); no attention, projection, MLP (~86% of the layer's matmul
   FLOPs, ~11% of the whole prefill's at 8 layers);
2. the last position: the layer's whole forward as a KV-cache decode step at sequence offset L - 1, its query
   attending to all L cached keys (the padding mask's last row), exactly what the causal prefill computes there.

Same arithmetic as the plain prefill at the positions that are read, up to float rounding (the last layer's
matmuls see b rows instead of b*L). Chosen once when the engine is built (``LastPositionLayer.supports``): the
local spec's attention (rotated-key cache) on a plain ``TransformerLayer`` on the last pipeline stage; anything
else (megatron's own cache, a DeepStack layer, which adds features at every position) runs the plain prefill.

Legend: L prompt positions of the chunk, b prompts of the chunk, h hidden.
"""

from __future__ import annotations

from contextlib import contextmanager

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_papo.models.common.attention import RopeCachingSelfAttention


class LastPositionLayer:
    """The last decoder layer's ``forward`` during a prefill: [L, b, h] in, [1, b, h] (the last position) out."""

    def __init__(self, layer: TransformerLayer):
        self.layer = layer

    @staticmethod
    def supports(layer) -> bool:
        return type(layer).forward is TransformerLayer.forward and isinstance(layer.self_attention,
                                                                             RopeCachingSelfAttention)

    def __call__(self, hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None,
                 **kwargs):
        layer, ctx, L = self.layer, inference_context, hidden_states.shape[0]
        # nothing to leave out, or megatron's own cache (un-rotated keys, the rotary table of every position)
        if L < 2 or rotary_pos_emb is None or not getattr(ctx, "keys_hold_rope", False):
            return TransformerLayer.forward(layer, hidden_states=hidden_states, attention_mask=attention_mask,
                                            rotary_pos_emb=rotary_pos_emb, inference_context=ctx, **kwargs)
        normed = layer.input_layernorm(hidden_states[:-1])  # [L-1, b, h]
        layer.self_attention.cache_key_value(normed, ctx, rotary_pos_emb[:-1])
        offset = ctx.sequence_len_offset
        ctx.sequence_len_offset = offset + L - 1
        try:
            mask = None if attention_mask is None else attention_mask[..., -1:, :]  # [b|1, 1, 1, L]
            return TransformerLayer.forward(layer, hidden_states=hidden_states[-1:], attention_mask=mask,
                                            rotary_pos_emb=rotary_pos_emb[-1:], inference_context=ctx, **kwargs)
        finally:
            ctx.sequence_len_offset = offset


@contextmanager
def last_layer_at_last_position(decoder, enabled: bool = True):
    """Inside the block the decoder's last layer runs as ``LastPositionLayer`` (prefill forwards only)."""
    layer = decoder.layers[-1] if enabled and len(decoder.layers) else None
    if layer is None:
        yield
        return
    layer.forward = LastPositionLayer(layer)
    try:
        yield
    finally:
        layer.__dict__.pop("forward", None)
