"""Qwen2.5-VL composition: the shared ``VLMBase`` (``models.common.vlm``) with a megatron GPTModel configured as
Qwen2.5 (GQA, QKV bias, RMSNorm, SwiGLU, M-RoPE in contiguous sections) and the windowed vision tower. Nothing
else differs from the base: this class only names its configs and tower.
"""

from __future__ import annotations

from megatron_papo.models.common.vlm import VLMBase
from megatron_papo.models.qwen2_5_vl.configs import language_config, vision_config
from megatron_papo.models.qwen2_5_vl.vision import VisionTower


class Qwen25VLModel(VLMBase):
    language_config = staticmethod(language_config)
    vision_config = staticmethod(vision_config)
    vision_tower = VisionTower
