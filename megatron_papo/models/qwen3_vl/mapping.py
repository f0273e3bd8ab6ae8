"""The Hugging Face <-> megatron name map of Qwen3-VL (entry kinds and transforms: ``megatron_papo.convert.mapping``).

HF names here are in the normalised layout the checkpoint reader uses (``visual.*``, ``model.layers.*``,
``lm_head``); ``hf_export_name`` gives the published Qwen3-VL layout (``model.visual.*``,
``model.language_model.*``) for writing. Differences from Qwen2.5-VL: patch embedding bias, the learned position
table, LayerNorm (weight and bias) and a plain GELU MLP in the vision blocks, the DeepStack mergers, and the
per-head q/k RMSNorm weights without QKV bias in the language model.
"""

from __future__ import annotations

from megatron_papo.convert.mapping import Entry
from megatron_papo.models.common.mapping import language_model_entries, language_model_shapes
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
    return entries + language_model_entries(spec, qk_norm=True)


def _merger_shapes(h: str, norm: int, width: int, out: int) -> dict:
    return {f"{h}.norm.weight": (norm,), f"{h}.norm.bias": (norm,), f"{h}.linear_fc1.weight": (width, width),
            f"{h}.linear_fc1.bias": (width,), f"{h}.linear_fc2.weight": (out, width), f"{h}.linear_fc2.bias": (out,)}


def expected_hf_shapes(spec: Qwen3VLSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the map reads, from the architecture alone (to check a checkpoint)."""
    v, h = spec.vision, spec.hidden_size
    w, f, mw = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    shapes = {"visual.patch_embed.proj.weight": (w, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
              "visual.patch_embed.proj.bias": (w,), "visual.pos_embed.weight": (v.num_position_embeddings, w)}
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
    return {**shapes, **language_model_shapes(spec, qk_norm=True)}


def hf_export_name(name: str) -> str:
    """Normalised name -> the published Qwen3-VL checkpoint layout."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name
