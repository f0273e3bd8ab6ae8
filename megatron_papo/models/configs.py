"""Kept for compatibility (scripts written before the family folders): the TransformerConfigs now live in
``models.common.configs`` and ``models.qwen2_5_vl.configs``; ``check_tp_divisibility`` here serves any family."""

from megatron_papo.models.qwen2_5_vl.configs import language_config, vision_config  # noqa: F401
from megatron_papo.models.registry import check_tp_divisibility  # noqa: F401
