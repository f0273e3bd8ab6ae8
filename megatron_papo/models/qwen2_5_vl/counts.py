"""Parameters (``--dry-run``; no allocation) and vision FLOPs of a Qwen2.5-VL rank, counted from the spec.
Megatron's split: attention heads, MLP columns and column-parallel biases divide by TP; norms, row-parallel
biases and the patch embedding are replicated. FLOPs (``models.common.counts``): SwiGLU MLP, window attention
except in ``fullatt_block_indexes``, one merger."""

from __future__ import annotations

from megatron_papo.models.common.counts import tower_flops
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec


def vision_flops(spec: VLMSpec, grid_thw) -> float:
    v = spec.vision
    return tower_flops(v, grid_thw, mlp_matrices=3, num_mergers=1, full_blocks=len(v.fullatt_block_indexes),
                       window_patches=(v.window_size // v.patch_size) ** 2)


def lm_layer(spec: VLMSpec, tp: int) -> float:
    """One decoder layer: QKV with bias + output projection + SwiGLU, split; two RMSNorms, not."""
    h, hd = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h           # QKV with bias, output projection
    mlp = 3 * h * spec.intermediate_size                     # gate, up, down (SwiGLU)
    return (attn + mlp) / tp + 2 * h                         # two RMSNorms, replicated


def vision(spec: VLMSpec, tp: int) -> float:
    """The windowed vision tower with its merger (first pipeline stage)."""
    v = spec.vision
    vh = v.hidden_size
    block = (3 * vh * vh + 3 * vh + vh * vh + vh + 3 * vh * v.intermediate_size + 2 * v.intermediate_size + vh) / tp
    block += 2 * vh
    merged = vh * v.spatial_merge_size ** 2
    merger = vh + (merged * merged + merged + merged * v.out_hidden_size) / tp + v.out_hidden_size
    return v.depth * block + 3 * v.temporal_patch_size * v.patch_size ** 2 * vh + merger


def param_counts(spec: VLMSpec, tp: int) -> tuple[float, float]:
    """(one language layer, the vision tower) per rank."""
    return lm_layer(spec, tp), vision(spec, tp)
