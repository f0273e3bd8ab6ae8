"""Kept for compatibility (scripts written before the family folders): Qwen2.5-VL's spec and presets now live in
``models.qwen2_5_vl.spec``."""

from megatron_papo.models.qwen2_5_vl.spec import (PRESETS, VisionSpec, VLMSpec, get_preset,  # noqa: F401
                                                  spec_from_hf_config)
