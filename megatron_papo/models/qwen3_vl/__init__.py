"""Qwen3-VL dense on megatron-core: spec and presets, layer specs (interleaved M-RoPE, DeepStack layers), the
vision tower with learned positions and DeepStack mergers, the composition, and the checkpoint name map; what it
shares with Qwen2.5-VL is ``megatron_papo.models.common``."""

from __future__ import annotations

from megatron_papo.models.qwen3_vl.configs import check_tp_divisibility
from megatron_papo.models.qwen3_vl.model import Qwen3VLModel
from megatron_papo.models.qwen3_vl.spec import (FAMILY, PRESETS, Qwen3VisionSpec, Qwen3VLSpec, get_preset,
                                                spec_from_hf_config)

__all__ = ["FAMILY", "PRESETS", "Qwen3VLModel", "Qwen3VLSpec", "Qwen3VisionSpec", "check_tp_divisibility",
           "get_preset", "spec_from_hf_config"]
