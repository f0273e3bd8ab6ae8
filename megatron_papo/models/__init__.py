"""Vision-language models on megatron-core: two families (Qwen2.5-VL, Qwen3-VL) behind one registry.

    model = build_vlm("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      vision_start_token_id=tok.vision_start_id)
    logits = model(input_ids, pixel_values=pv, image_grid_thw=grid)   # [b, s, V/tp] on the last stage

``build_vlm``, ``get_preset`` and ``spec_from_hf_config`` accept either family (``models.registry``). Layout:
``common/`` (what the families share), ``qwen2_5_vl/`` and ``qwen3_vl/`` (one folder per family), ``registry.py``.
"""

from megatron_papo.models.common.rope_index import get_rope_index
from megatron_papo.models.common.specs import local_layer_spec
from megatron_papo.models.common.vlm import VLMBase, padded_vocab_size
from megatron_papo.models.qwen2_5_vl import Qwen25VLModel, VisionSpec, VLMSpec
from megatron_papo.models.registry import (
    all_presets, build_vlm, check_tp_divisibility, family_of_preset, family_of_spec, get_family, get_preset,
    spec_from_hf_config,
)

PRESETS = all_presets()

__all__ = [
    "PRESETS", "Qwen25VLModel", "VLMBase", "VLMSpec", "VisionSpec", "all_presets", "build_vlm",
    "check_tp_divisibility", "family_of_preset", "family_of_spec", "get_family", "get_preset", "get_rope_index",
    "local_layer_spec", "padded_vocab_size", "spec_from_hf_config",
]
