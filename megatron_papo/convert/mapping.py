"""The declarative Hugging Face <-> megatron name maps: their entries and the tensor transforms they name. Each
family's map is in its folder (``models/qwen2_5_vl/mapping.py``, ``models/qwen3_vl/mapping.py``).

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


def name_map(spec) -> list[Entry]:
    """Every megatron parameter of the full model (TP=1, PP=1 names) with its HF source, from the spec's family
    (``models/<family>/mapping.py``)."""
    from megatron_papo.models.registry import family_of_spec

    return family_of_spec(spec).mapping().name_map(spec)


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


def to_mcore(e: Entry, hf: list[torch.Tensor], spec) -> torch.Tensor:
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


def to_hf(e: Entry, t: torch.Tensor, spec) -> list[torch.Tensor]:
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
