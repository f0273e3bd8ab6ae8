"""Qwen2.5-VL on megatron-core: spec and presets with the Hugging Face config reader (spec.py), TransformerConfigs
(configs.py), the windowed vision tower (vision.py), the composition (model.py), the checkpoint name map
(mapping.py) and vision FLOPs (counts.py); what it shares with Qwen3-VL is ``megatron_papo.models.common``."""

from __future__ import annotations

from megatron_papo.models.qwen2_5_vl.configs import check_tp_divisibility
from megatron_papo.models.qwen2_5_vl.model import Qwen25VLModel
from megatron_papo.models.qwen2_5_vl.spec import FAMILY, PRESETS, VisionSpec, VLMSpec, get_preset, spec_from_hf_config

__all__ = ["FAMILY", "PRESETS", "Qwen25VLModel", "VLMSpec", "VisionSpec", "check_tp_divisibility",
           "get_preset", "spec_from_hf_config"]
