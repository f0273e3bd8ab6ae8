"""Parameters (``--dry-run``; no allocation) and vision FLOPs of a Qwen3-VL rank, counted from the spec.
Megatron's split: column-parallel weights and biases and row-parallel weights divide by TP; norms, row-parallel
biases, the patch embedding and the position table are replicated."""

from __future__ import annotations

from megatron_papo.models.common.counts import tower_flops
from megatron_papo.models.qwen3_vl.spec import Qwen3VLSpec


def lm_layer(spec: Qwen3VLSpec, tp: int) -> float:
    """One decoder layer: QKV (no bias) + output projection + SwiGLU, split; two RMSNorms and q/k norms, not."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return (h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size) / tp + 2 * h + 2 * spec.head_dim


def _merger(width: int, norm: int, out: int, tp: int) -> float:
    return 2 * norm + (width * width + width + width * out) / tp + out


def vision(spec: Qwen3VLSpec, tp: int) -> float:
    """The vision tower with its merger and DeepStack mergers (first pipeline stage)."""
    v = spec.vision
    w, f, mw = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    block = (3 * w * w + 3 * w + w * w + w * f + f + f * w) / tp + 2 * w + 4 * w  # biases of proj/fc2 + 2 LayerNorms
    embed = v.patch_dim * w + w + v.num_position_embeddings * w
    mergers = _merger(mw, w, spec.hidden_size, tp) + spec.num_deepstack * _merger(mw, mw, spec.hidden_size, tp)
    return v.depth * block + embed + mergers


def param_counts(spec: Qwen3VLSpec, tp: int) -> tuple[float, float]:
    """(one language layer, the vision tower) per rank."""
    return lm_layer(spec, tp), vision(spec, tp)


def vision_flops(spec: Qwen3VLSpec, grid_thw) -> float:
    """Forward FLOPs of the vision tower (``models.common.counts``): GELU MLP, full attention in every block, the
    merger and one DeepStack merger per level."""
    v = spec.vision
    return tower_flops(v, grid_thw, mlp_matrices=2, num_mergers=1 + spec.num_deepstack, full_blocks=v.depth,
                       window_patches=None)
