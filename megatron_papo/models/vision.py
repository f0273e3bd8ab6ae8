"""Kept for compatibility (scripts written before the family folders): the shared vision pieces now live in
``models.common.vision``, the Qwen2.5-VL tower in ``models.qwen2_5_vl.vision``."""

from megatron_papo.models.common.vision import (block_diagonal_mask, vision_position_ids,  # noqa: F401
                                                vision_sharded_state_dict)
from megatron_papo.models.qwen2_5_vl.vision import PatchMerger, VisionTower, window_index  # noqa: F401
