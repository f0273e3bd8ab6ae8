"""FLOPs of the Qwen2.5-VL vision tower (``models.common.counts``): SwiGLU MLP, window attention except in
``fullatt_block_indexes``, one merger. (Its parameter counts for ``--dry-run``: ``training.layout``.)"""

from __future__ import annotations

from megatron_papo.models.common.counts import tower_flops
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec


def vision_flops(spec: VLMSpec, grid_thw) -> float:
    v = spec.vision
    return tower_flops(v, grid_thw, mlp_matrices=3, num_mergers=1, full_blocks=len(v.fullatt_block_indexes),
                       window_patches=(v.window_size // v.patch_size) ** 2)
