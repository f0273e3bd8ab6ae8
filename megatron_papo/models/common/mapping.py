"""The language-model part of the Hugging Face <-> megatron name maps, shared by every family (entry kinds and
transforms: ``megatron_papo.convert.mapping``; each family's full map: ``models/<family>/mapping.py``).

Both Qwen2.5-VL and Qwen3-VL language models are Qwen decoders with the same tensor names; they differ only in
the attention's extras: a QKV bias (Qwen2.5) or per-head q/k RMSNorm weights (Qwen3). HF names are in the
published / normalised layout (``model.layers.*``, ``model.norm``, ``lm_head``).
"""

from __future__ import annotations

from megatron_papo.convert.mapping import Entry


def language_layer_entries(i: int, heads: tuple, qkv_bias: bool = False, qk_norm: bool = False) -> list[Entry]:
    """Decoder layer ``i``; ``heads`` = (num_heads, num_kv_heads, head_dim) for the qkv interleave."""
    m, h = f"language_model.decoder.layers.{i}", f"model.layers.{i}"
    a, qkv = f"{m}.self_attention", lambda p: tuple(f"{h}.self_attn.{x}_proj.{p}" for x in "qkv")
    out = [Entry(f"{m}.input_layernorm.weight", (f"{h}.input_layernorm.weight",)),
           Entry(f"{a}.linear_qkv.weight", qkv("weight"), "qkv", 0, heads)]
    if qkv_bias:
        out.append(Entry(f"{a}.linear_qkv.bias", qkv("bias"), "qkv", 0, heads))
    if qk_norm:
        out += [Entry(f"{a}.q_layernorm.weight", (f"{h}.self_attn.q_norm.weight",)),
                Entry(f"{a}.k_layernorm.weight", (f"{h}.self_attn.k_norm.weight",))]
    return out + [
        Entry(f"{a}.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",), tp_axis=1),
        Entry(f"{m}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",)),
        Entry(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "glu", 0),
        Entry(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), tp_axis=1),
    ]


def language_model_entries(spec, qkv_bias: bool = False, qk_norm: bool = False) -> list[Entry]:
    """Word embeddings, every decoder layer, the final norm and (untied) the output layer."""
    heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    out = [Entry("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0)]
    for i in range(spec.num_layers):
        out += language_layer_entries(i, heads, qkv_bias, qk_norm)
    out.append(Entry("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not spec.tie_word_embeddings:
        out.append(Entry("language_model.output_layer.weight", ("lm_head.weight",), "vocab", 0))
    return out


def language_model_shapes(spec, qkv_bias: bool = False, qk_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of the language model the map reads (``lm_head`` listed even when tied)."""
    h, hd, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(spec.num_layers):
        b = f"model.layers.{i}"
        shapes.update({f"{b}.input_layernorm.weight": (h,), f"{b}.post_attention_layernorm.weight": (h,),
                       f"{b}.self_attn.q_proj.weight": (q, h), f"{b}.self_attn.k_proj.weight": (kv, h),
                       f"{b}.self_attn.v_proj.weight": (kv, h), f"{b}.self_attn.o_proj.weight": (h, q),
                       f"{b}.mlp.gate_proj.weight": (f, h), f"{b}.mlp.up_proj.weight": (f, h),
                       f"{b}.mlp.down_proj.weight": (h, f)})
        if qkv_bias:
            shapes.update({f"{b}.self_attn.q_proj.bias": (q,), f"{b}.self_attn.k_proj.bias": (kv,),
                           f"{b}.self_attn.v_proj.bias": (kv,)})
        if qk_norm:
            shapes.update({f"{b}.self_attn.q_norm.weight": (hd,), f"{b}.self_attn.k_norm.weight": (hd,)})
    return shapes
