"""The declarative Hugging Face <-> megatron name map for Qwen2.5-VL, and the tensor transforms it names.

Every megatron parameter (full, unsharded, global layer index) is one `Entry`: its megatron name, the HF
tensor names it is made of, a `kind` saying how they combine, and its tensor-parallel axis. The kinds:
  copy  one HF tensor, same layout
  qkv   HF q, k, v (or a fused [q; k; v]) -> megatron's per-group interleave [g0: q.., k, v | g1: ...]
  glu   HF gate, up -> linear_fc1 = [gate; up]; its TP shard is [gate_r; up_r], not a plain chunk
  patch HF Conv3d weight [hv, c, t, p, p] <-> linear weight [hv, c*t*p*p]
  vocab embedding / output rows, padded to the megatron vocabulary size
HF names are the published checkpoint layout (`visual.*`, `model.layers.*`, `lm_head`); the transformers 5
layout (`model.visual.*`, `model.language_model.*`) is normalised to it on reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_papo.models.common.vlm import padded_vocab_size
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec


@dataclass(frozen=True)
class Entry:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "copy"
    # tensor-parallel split axis of the megatron tensor (None: replicated on every TP rank)
    tp_axis: int | None = None
    # (num_heads, num_groups, head_dim) for qkv entries
    heads: tuple[int, int, int] | None = None


def normalise_hf_name(name: str) -> str:
    """transformers-5 names -> the published layout."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


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


def _fuse_qkv(q, k, v, heads):
    nh, ng, hd = heads
    tail = q.shape[1:]
    parts = [q.reshape(ng, nh // ng * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _split_qkv(t, heads):
    nh, ng, hd = heads
    tail = t.shape[1:]
    g = t.reshape(ng, (nh // ng + 2) * hd, *tail)
    q, k, v = torch.split(g, [nh // ng * hd, hd, hd], dim=1)
    return q.reshape(nh * hd, *tail), k.reshape(ng * hd, *tail), v.reshape(ng * hd, *tail)


def to_mcore(e: Entry, hf: list[torch.Tensor], spec: VLMSpec) -> torch.Tensor:
    """The full megatron tensor of entry ``e`` from its HF tensors."""
    if e.kind == "qkv":
        return _fuse_qkv(*(hf if len(hf) == 3 else torch.chunk(hf[0], 3, dim=0)), e.heads)
    if e.kind == "glu":
        return torch.cat(hf, dim=0)
    if e.kind == "patch":
        return hf[0].reshape(hf[0].shape[0], -1)
    if e.kind == "vocab":
        pad = padded_vocab_size(spec.vocab_size) - hf[0].shape[0]
        return torch.cat([hf[0], hf[0].new_zeros(pad, *hf[0].shape[1:])]) if pad else hf[0]
    return hf[0]


def to_hf(e: Entry, t: torch.Tensor, spec: VLMSpec) -> list[torch.Tensor]:
    """The HF tensors of entry ``e`` from its full megatron tensor (inverse of to_mcore)."""
    if e.kind == "qkv":
        q, k, v = _split_qkv(t, e.heads)
        return [torch.cat([q, k, v])] if len(e.hf) == 1 else [q, k, v]
    if e.kind == "glu":
        return list(torch.chunk(t, 2, dim=0))
    if e.kind == "patch":
        vs = spec.vision
        return [t.reshape(t.shape[0], vs.in_channels, vs.temporal_patch_size, vs.patch_size, vs.patch_size)]
    if e.kind == "vocab":
        return [t[: spec.vocab_size]]
    return [t]


def tp_shard(e: Entry, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full megatron tensor (qkv is group-interleaved, so a plain chunk is right)."""
    if e.tp_axis is None or tp_size == 1:
        return full
    if e.kind == "glu":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]])
    return torch.chunk(full, tp_size, dim=e.tp_axis)[tp_rank]
