"""The Hugging Face <-> megatron name map of Qwen2.5-VL (entry kinds, transforms: ``megatron_papo.convert.mapping``).

HF names are the published checkpoint layout (``visual.*``, ``model.layers.*``, ``lm_head``), which is also the
layout written (``hf_export_name``); the transformers 5 layout is normalised to it on reading.
"""

from __future__ import annotations

from megatron_papo.convert.mapping import Entry
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec


def _layer_entries(m: str, h: str, heads, fused_qkv: bool, bias_linear: bool, names: dict) -> list[Entry]:
    qkv_src = lambda p: (f"{h}.{names['qkv']}.{p}",) if fused_qkv else tuple(f"{h}.{x}.{p}" for x in names["qkv"])
    out = [
        Entry(f"{m}.input_layernorm.weight", (f"{h}.{names['norm1']}.weight",)),
        Entry(f"{m}.self_attention.linear_qkv.weight", qkv_src("weight"), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_qkv.bias", qkv_src("bias"), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_proj.weight", (f"{h}.{names['proj']}.weight",), tp_axis=1),
        Entry(f"{m}.pre_mlp_layernorm.weight", (f"{h}.{names['norm2']}.weight",)),
        Entry(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "glu", 0),
        Entry(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), tp_axis=1),
    ]
    if bias_linear:
        out += [
            Entry(f"{m}.self_attention.linear_proj.bias", (f"{h}.{names['proj']}.bias",)),
            Entry(f"{m}.mlp.linear_fc1.bias", (f"{h}.mlp.gate_proj.bias", f"{h}.mlp.up_proj.bias"), "glu", 0),
            Entry(f"{m}.mlp.linear_fc2.bias", (f"{h}.mlp.down_proj.bias",)),
        ]
    return out


_LM_NAMES = dict(qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), proj="self_attn.o_proj",
                 norm1="input_layernorm", norm2="post_attention_layernorm")
_VIS_NAMES = dict(qkv="attn.qkv", proj="attn.proj", norm1="norm1", norm2="norm2")


def name_map(spec: VLMSpec) -> list[Entry]:
    """Every megatron parameter of the full model (TP=1, PP=1 names) with its HF source."""
    v = spec.vision
    vis_heads = (v.num_heads, v.num_heads, v.hidden_size // v.num_heads)
    entries = [Entry("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), "patch")]
    for i in range(v.depth):
        entries += _layer_entries(f"vision.layers.{i}", f"visual.blocks.{i}", vis_heads, True, True, _VIS_NAMES)
    entries += [
        Entry("vision.merger.norm.weight", ("visual.merger.ln_q.weight",)),
        Entry("vision.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), tp_axis=0),
        Entry("vision.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), tp_axis=0),
        Entry("vision.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), tp_axis=1),
        Entry("vision.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",)),
        Entry("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0),
    ]
    lm_heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    for i in range(spec.num_layers):
        entries += _layer_entries(f"language_model.decoder.layers.{i}", f"model.layers.{i}", lm_heads, False,
                                  False, _LM_NAMES)
    entries.append(Entry("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not spec.tie_word_embeddings:
        entries.append(Entry("language_model.output_layer.weight", ("lm_head.weight",), "vocab", 0))
    return entries


def hf_export_name(name: str) -> str:
    """Names are written in the published Qwen2.5-VL layout, the one the map uses."""
    return name


def expected_hf_shapes(spec: VLMSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the map reads, from the architecture alone (to check a checkpoint)."""
    v, h, hd = spec.vision, spec.hidden_size, spec.head_dim
    shapes = {"visual.patch_embed.proj.weight": (v.hidden_size, v.in_channels, v.temporal_patch_size,
                                                 v.patch_size, v.patch_size),
              "model.embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
              "model.norm.weight": (h,), "visual.merger.ln_q.weight": (v.hidden_size,)}
    mw = v.hidden_size * v.spatial_merge_size ** 2
    shapes.update({"visual.merger.mlp.0.weight": (mw, mw), "visual.merger.mlp.0.bias": (mw,),
                   "visual.merger.mlp.2.weight": (v.out_hidden_size, mw), "visual.merger.mlp.2.bias": (v.out_hidden_size,)})
    for i in range(v.depth):
        b, w, f = f"visual.blocks.{i}", v.hidden_size, v.intermediate_size
        shapes.update({f"{b}.norm1.weight": (w,), f"{b}.norm2.weight": (w,), f"{b}.attn.qkv.weight": (3 * w, w),
                       f"{b}.attn.qkv.bias": (3 * w,), f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
                       f"{b}.mlp.gate_proj.weight": (f, w), f"{b}.mlp.up_proj.weight": (f, w),
                       f"{b}.mlp.gate_proj.bias": (f,), f"{b}.mlp.up_proj.bias": (f,),
                       f"{b}.mlp.down_proj.weight": (w, f), f"{b}.mlp.down_proj.bias": (w,)})
    q, kv, f = spec.num_heads * hd, spec.num_kv_heads * hd, spec.intermediate_size
    for i in range(spec.num_layers):
        b = f"model.layers.{i}"
        shapes.update({f"{b}.input_layernorm.weight": (h,), f"{b}.post_attention_layernorm.weight": (h,),
                       f"{b}.self_attn.q_proj.weight": (q, h), f"{b}.self_attn.q_proj.bias": (q,),
                       f"{b}.self_attn.k_proj.weight": (kv, h), f"{b}.self_attn.k_proj.bias": (kv,),
                       f"{b}.self_attn.v_proj.weight": (kv, h), f"{b}.self_attn.v_proj.bias": (kv,),
                       f"{b}.self_attn.o_proj.weight": (h, q), f"{b}.mlp.gate_proj.weight": (f, h),
                       f"{b}.mlp.up_proj.weight": (f, h), f"{b}.mlp.down_proj.weight": (h, f)})
    return shapes
