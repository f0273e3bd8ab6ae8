"""A decode step that does only what a step needs: the local spec at tensor- and pipeline-parallel size 1.

megatron's forward of one decode step (``Stages.forward``) walks GPTModel -> TransformerBlock ->
TransformerLayer -> SelfAttention / MLP, each module with its hooks, checks, identity tensor-parallel regions and
bias-dropout-add, and recomputes cos / sin of the rotary table in every layer (twice: query and key).
``LeanDecodeStep`` computes the same step directly from the same modules' weights (no copies; the linear
layers' own ``forward``, i.e. the prepacked matmul of ``rollout.fast_decode`` inside a ``generate`` call):

    embedding -> per layer [norm -> qkv (+bias) -> split -> (Qwen3-VL: q / k norm) -> rotary (cos / sin of the
    step's positions, computed once per step) -> cache write (``decode_kv``) -> shared-prompt attention
    (``SDPAttention._shared_prefix_decode``) -> projection -> residual -> norm -> fc1 -> SwiGLU -> fc2 ->
    residual] -> final norm -> output layer

Same ops in the same order as megatron's modules, so the logits are equal up to float rounding (in practice
bit for bit; ``tests/test_lean_decode.py``). It works on the shared-prompt cache (``rollout.kv_cache``), rows
at one step or at their own steps (continuous batching: ``set_row_steps`` on the context). Whether a model can
use it is decided once, when the engine is built (``LeanDecodeStep.supports``); every other model keeps
megatron's forward. DeepStack layers (Qwen3-VL) add nothing on a decode step (no image features), so they are
plain layers here.

Module hooks: the step calls the submodules' ``forward`` directly, so their hooks do not fire; a model whose
language model carries forward hooks (or the VLM forward pre-hooks) when the engine is built keeps megatron's
forward. The VLM's own forward hooks do act on the logits (the trainer's ban of the vision special tokens,
``training.banned_tokens``, is one): the step runs them on its logits as the VLM's forward would.

Legend: b rows, h hidden, np query heads, ng query groups, rep = np / ng, hn head dim, Vs vocabulary (TP = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_papo.models.common.attention import RopeCachingSelfAttention, SDPAttention


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's rotate-half RoPE (``_apply_rotary_pos_emb_bshd``) on a precomputed cos / sin:
    t [1, b, heads, hn], cos / sin [1, b, 1, hn]."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


def _plus_bias(out_bias) -> torch.Tensor:
    out, bias = out_bias
    return out if bias is None else out + bias


def _layer_supported(layer) -> bool:
    attn, cfg = getattr(layer, "self_attention", None), layer.config
    return (isinstance(layer, TransformerLayer) and isinstance(attn, RopeCachingSelfAttention)
            and isinstance(attn.core_attention, SDPAttention) and isinstance(layer.mlp, MLP)
            and type(layer.cross_attention).__name__ == "IdentityOp"
            and cfg.gated_linear_unit and cfg.activation_func is F.silu
            and getattr(cfg, "activation_func_clamp_value", None) is None
            and not getattr(cfg, "glu_linear_offset", 0.0)
            and not getattr(cfg, "attention_output_gate", False))


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LeanDecodeStep:
    """``step(ids [b, 1], position_ids [3, b, 1], ctx) -> logits [b, Vs]``, ctx a ``SharedPrefixContext`` that
    shares its prefix (as ``Stages.forward(..., prefill=False)`` returns on a single stage)."""

    def __init__(self, vlm):
        self.vlm, self.lm = vlm, vlm.language_model
        self.layers = list(self.lm.decoder.layers)
        attn = self.layers[0].self_attention
        self.ng = attn.num_query_groups_per_partition
        self.np, self.hn = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        self.split = [self.np // self.ng * self.hn, self.hn, self.hn]
        pad = torch.arange(vlm.padded_vocab_size) >= vlm.spec.vocab_size  # [Vs] True = vocabulary padding
        self.pad = pad.to(self.lm.output_layer.weight.device) if bool(pad.any()) else None

    @staticmethod
    def supports(stages) -> bool:
        """Capability: one stage, one tensor-parallel rank, no sequence parallelism, M-RoPE rotate-half on every
        head dim, and every layer megatron's local-spec layer (rotated-key attention on SDPA, SwiGLU MLP)."""
        lm = stages.model.language_model
        cfg = lm.config
        return (stages.pp_size == 1 and stages.tp_size == 1 and not cfg.sequence_parallel
                and lm.position_embedding_type == "mrope" and not cfg.rotary_interleaved
                and getattr(lm, "rotary_percent", 1.0) == 1.0 and not cfg.fp32_residual_connection
                and not cfg.apply_residual_connection_post_layernorm and not cfg.multi_latent_attention
                and not getattr(cfg, "flash_decode", False) and hasattr(stages.model, "padded_vocab_size")
                and len(lm.decoder.layers) > 0 and all(_layer_supported(layer) for layer in lm.decoder.layers))

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, ctx) -> torch.Tensor:
        lm = self.lm
        h = lm.embedding.word_embeddings.forward(ids.t())  # [1, b, h]
        freqs = lm.rotary_pos_emb(position_ids, lm.mrope_section)  # [1, b, 1, hn], float32: once for all layers
        cos, sin = torch.cos(freqs).to(h.dtype), torch.sin(freqs).to(h.dtype)
        for layer in self.layers:
            h = self._attention(layer, h, cos, sin, ctx)
            h = self._mlp(layer, h)
        h = lm.decoder.final_layernorm.forward(h)
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        logits = lm.output_layer.forward(h, weight=weight)[0][0]  # [b, Vs]
        logits = logits if self.pad is None else logits.masked_fill(self.pad, float("-inf"))
        return self._vlm_hooks(logits, ids, position_ids, ctx) if self.vlm._forward_hooks else logits

    def _vlm_hooks(self, logits, ids, position_ids, ctx) -> torch.Tensor:
        """The VLM's forward hooks on the logits, called as the VLM's forward in ``Stages.forward`` calls them
        (output [b, 1, Vs]): without them the trainer's banned vision tokens would keep their probability here."""
        vlm, out, args = self.vlm, logits[:, None], (ids, position_ids, None)
        for key, hook in list(vlm._forward_hooks.items()):
            kwargs = (dict(inference_context=ctx),) if key in vlm._forward_hooks_with_kwargs else ()
            res = hook(vlm, args, *kwargs, out)
            out = out if res is None else res
        return out[:, 0]

    def _attention(self, layer, h: torch.Tensor, cos, sin, ctx) -> torch.Tensor:
        """h + attention(norm(h)), the new key / value written to the cache: [1, b, h]."""
        attn, b = layer.self_attention, h.shape[1]
        qkv = _plus_bias(attn.linear_qkv.forward(layer.input_layernorm.forward(h)))  # [1, b, ng*(rep+2)*hn]
        q, k, v = torch.split(qkv.view(1, b, self.ng, -1), self.split, dim=3)  # [1, b, ng, rep*hn | hn | hn]
        q = q.reshape(1, b, self.np, self.hn)
        if attn.q_layernorm is not None:
            q = attn.q_layernorm.forward(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm.forward(k)
        kv = ctx.decode_kv(attn.layer_number, rotate(k, cos, sin), v)
        out = attn.core_attention._shared_prefix_decode(rotate(q, cos, sin), kv)  # [1, b, np*hn]
        return h + _plus_bias(attn.linear_proj.forward(out))

    @staticmethod
    def _mlp(layer, h: torch.Tensor) -> torch.Tensor:
        """h + fc2(SwiGLU(fc1(norm(h)))): [1, b, h]."""
        mlp = layer.mlp
        gate, up = torch.chunk(_plus_bias(mlp.linear_fc1.forward(layer.pre_mlp_layernorm.forward(h))), 2, dim=-1)
        return h + _plus_bias(mlp.linear_fc2.forward(F.silu(gate) * up))
