"""The Hugging Face <-> megatron name map of Qwen2.5-VL (entry kinds, transforms: ``megatron_papo.convert.mapping``).

HF names are the published checkpoint layout (``visual.*``, ``model.layers.*``, ``lm_head``), which is also the
layout written (``hf_export_name``); the transformers 5 layout is normalised to it on reading.
"""

from __future__ import annotations

from megatron_papo.convert.mapping import Entry
from megatron_papo.models.common.mapping import language_model_entries, language_model_shapes
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec


def _vision_block(i: int, heads) -> list[Entry]:
    m, h = f"vision.layers.{i}", f"visual.blocks.{i}"
    return [
        Entry(f"{m}.input_layernorm.weight", (f"{h}.norm1.weight",)),
        Entry(f"{m}.self_attention.linear_qkv.weight", (f"{h}.attn.qkv.weight",), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_qkv.bias", (f"{h}.attn.qkv.bias",), "qkv", 0, heads),
        Entry(f"{m}.self_attention.linear_proj.weight", (f"{h}.attn.proj.weight",), tp_axis=1),
        Entry(f"{m}.pre_mlp_layernorm.weight", (f"{h}.norm2.weight",)),
        Entry(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "glu", 0),
        Entry(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), tp_axis=1),
        Entry(f"{m}.self_attention.linear_proj.bias", (f"{h}.attn.proj.bias",)),
        Entry(f"{m}.mlp.linear_fc1.bias", (f"{h}.mlp.gate_proj.bias", f"{h}.mlp.up_proj.bias"), "glu", 0),
        Entry(f"{m}.mlp.linear_fc2.bias", (f"{h}.mlp.down_proj.bias",)),
    ]


def name_map(spec: VLMSpec) -> list[Entry]:
    """Every megatron parameter of the full model (TP=1, PP=1 names) with its HF source."""
    v = spec.vision
    vis_heads = (v.num_heads, v.num_heads, v.hidden_size // v.num_heads)
    entries = [Entry("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), "patch")]
    for i in range(v.depth):
        entries += _vision_block(i, vis_heads)
    entries += [
        Entry("vision.merger.norm.weight", ("visual.merger.ln_q.weight",)),
        Entry("vision.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), tp_axis=0),
        Entry("vision.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), tp_axis=0),
        Entry("vision.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), tp_axis=1),
        Entry("vision.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",)),
    ]
    return entries + language_model_entries(spec, qkv_bias=True)


def hf_export_name(name: str) -> str:
    """Names are written in the published Qwen2.5-VL layout, the one the map uses."""
    return name


def expected_hf_shapes(spec: VLMSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the map reads, from the architecture alone (to check a checkpoint)."""
    v = spec.vision
    shapes = {"visual.patch_embed.proj.weight": (v.hidden_size, v.in_channels, v.temporal_patch_size,
                                                 v.patch_size, v.patch_size),
              "visual.merger.ln_q.weight": (v.hidden_size,)}
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
    return {**shapes, **language_model_shapes(spec, qkv_bias=True)}
