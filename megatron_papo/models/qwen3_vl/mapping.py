"""The Hugging Face <-> megatron name map of Qwen3-VL (entry kinds and transforms: ``megatron_papo.convert.mapping``).

HF names here are in the normalised layout the checkpoint reader uses (``visual.*``, ``model.layers.*``,
``lm_head``); ``hf_export_name`` gives the published Qwen3-VL layout (``model.visual.*``,
``model.language_model.*``) for writing. Differences from Qwen2.5-VL: patch embedding bias, the learned position
table, LayerNorm (weight and bias) and a plain GELU MLP in the vision blocks, the DeepStack mergers, and the
per-head q/k RMSNorm weights without QKV bias in the language model.
"""

from __future__ import annotations

from megatron_papo.convert.mapping import Entry
from megatron_papo.models.qwen3_vl.spec import Qwen3VLSpec


def _vision_block(i: int, heads) -> list[Entry]:
    m, h = f"vision.layers.{i}", f"visual.blocks.{i}"
    out = []
    for mc, hf in (("input_layernorm", "norm1"), ("pre_mlp_layernorm", "norm2")):
        out += [Entry(f"{m}.{mc}.{p}", (f"{h}.{hf}.{p}",)) for p in ("weight", "bias")]
    out += [
        Entry(f"{m}.self_attention.linear_qkv.weight", (f"{h}.attn.qkv.weight",), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_qkv.bias", (f"{h}.attn.qkv.bias",), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_proj.weight", (f"{h}.attn.proj.weight",), tp_axis=1),
        Entry(f"{m}.self_attention.linear_proj.bias", (f"{h}.attn.proj.bias",)),
        Entry(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.linear_fc1.weight",), tp_axis=0),
        Entry(f"{m}.mlp.linear_fc1.bias", (f"{h}.mlp.linear_fc1.bias",), tp_axis=0),
        Entry(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.linear_fc2.weight",), tp_axis=1),
        Entry(f"{m}.mlp.linear_fc2.bias", (f"{h}.mlp.linear_fc2.bias",)),
    ]
    return out


def _merger(m: str, h: str) -> list[Entry]:
    return [Entry(f"{m}.norm.weight", (f"{h}.norm.weight",)), Entry(f"{m}.norm.bias", (f"{h}.norm.bias",)),
            Entry(f"{m}.linear_fc1.weight", (f"{h}.linear_fc1.weight",), tp_axis=0),
            Entry(f"{m}.linear_fc1.bias", (f"{h}.linear_fc1.bias",), tp_axis=0),
            Entry(f"{m}.linear_fc2.weight", (f"{h}.linear_fc2.weight",), tp_axis=1),
            Entry(f"{m}.linear_fc2.bias", (f"{h}.linear_fc2.bias",))]


def _lm_layer(i: int, heads) -> list[Entry]:
    m, h = f"language_model.decoder.layers.{i}", f"model.layers.{i}"
    a = f"{m}.self_attention"
    return [
        Entry(f"{m}.input_layernorm.weight", (f"{h}.input_layernorm.weight",)),
        Entry(f"{a}.linear_qkv.weight", tuple(f"{h}.self_attn.{x}_proj.weight" for x in "qkv"), "qkv", 0, heads),
        Entry(f"{a}.q_layernorm.weight", (f"{h}.self_attn.q_norm.weight",)),
        Entry(f"{a}.k_layernorm.weight", (f"{h}.self_attn.k_norm.weight",)),
        Entry(f"{a}.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",), tp_axis=1),
        Entry(f"{m}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",)),
        Entry(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "glu", 0),
        Entry(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), tp_axis=1),
    ]


def name_map(spec: Qwen3VLSpec) -> list[Entry]:
    """Every megatron parameter of the full model (TP=1, PP=1 names) with its HF source."""
    v = spec.vision
    entries = [Entry("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), "patch"),
               Entry("vision.patch_embed.bias", ("visual.patch_embed.proj.bias",)),
               Entry("vision.pos_embed.weight", ("visual.pos_embed.weight",))]
    for i in range(v.depth):
        entries += _vision_block(i, (v.num_heads, v.num_heads, v.hidden_size // v.num_heads))
    entries += _merger("vision.merger", "visual.merger")
    for k in range(spec.num_deepstack):
        entries += _merger(f"vision.deepstack_mergers.{k}", f"visual.deepstack_merger_list.{k}")
    entries.append(Entry("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0))
    for i in range(spec.num_layers):
        entries += _lm_layer(i, (spec.num_heads, spec.num_kv_heads, spec.head_dim))
    entries.append(Entry("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not spec.tie_word_embeddings:
        entries.append(Entry("language_model.output_layer.weight", ("lm_head.weight",), "vocab", 0))
    return entries


def _merger_shapes(h: str, norm: int, width: int, out: int) -> dict:
    return {f"{h}.norm.weight": (norm,), f"{h}.norm.bias": (norm,), f"{h}.linear_fc1.weight": (width, width),
            f"{h}.linear_fc1.bias": (width,), f"{h}.linear_fc2.weight": (out, width), f"{h}.linear_fc2.bias": (out,)}


def expected_hf_shapes(spec: Qwen3VLSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the map reads, from the architecture alone (to check a checkpoint)."""
    v, h, hd = spec.vision, spec.hidden_size, spec.head_dim
    w, f, mw = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    shapes = {"visual.patch_embed.proj.weight": (w, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
              "visual.patch_embed.proj.bias": (w,), "visual.pos_embed.weight": (v.num_position_embeddings, w),
              "model.embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
              "model.norm.weight": (h,)}
    shapes.update(_merger_shapes("visual.merger", w, mw, h))
    for k in range(spec.num_deepstack):
        shapes.update(_merger_shapes(f"visual.deepstack_merger_list.{k}", mw, mw, h))
    for i in range(v.depth):
        b = f"visual.blocks.{i}"
        shapes.update({f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,), f"{b}.norm2.weight": (w,),
                       f"{b}.norm2.bias": (w,), f"{b}.attn.qkv.weight": (3 * w, w), f"{b}.attn.qkv.bias": (3 * w,),
                       f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
                       f"{b}.mlp.linear_fc1.weight": (f, w), f"{b}.mlp.linear_fc1.bias": (f,),
                       f"{b}.mlp.linear_fc2.weight": (w, f), f"{b}.mlp.linear_fc2.bias": (w,)})
    q, kv, f = spec.num_heads * hd, spec.num_kv_heads * hd, spec.intermediate_size
    for i in range(spec.num_layers):
        b = f"model.layers.{i}"
        shapes.update({f"{b}.input_layernorm.weight": (h,), f"{b}.post_attention_layernorm.weight": (h,),
                       f"{b}.self_attn.q_proj.weight": (q, h), f"{b}.self_attn.k_proj.weight": (kv, h),
                       f"{b}.self_attn.v_proj.weight": (kv, h), f"{b}.self_attn.o_proj.weight": (h, q),
                       f"{b}.self_attn.q_norm.weight": (hd,), f"{b}.self_attn.k_norm.weight": (hd,),
                       f"{b}.mlp.gate_proj.weight": (f, h), f"{b}.mlp.up_proj.weight": (f, h),
                       f"{b}.mlp.down_proj.weight": (h, f)})
    return shapes


def hf_export_name(name: str) -> str:
    """Normalised name -> the published Qwen3-VL checkpoint layout."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name
