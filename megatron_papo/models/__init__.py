"""Qwen2.5-VL on megatron-core: presets, layer specs, the vision tower and the VLM composition.

    model = build_vlm("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      vision_start_token_id=tok.vision_start_id)
    logits = model(input_ids, pixel_values=pv, image_grid_thw=grid)   # [b, s, V/tp] on the last stage
"""

from megatron_papo.models.presets import PRESETS, VisionSpec, VLMSpec, get_preset, spec_from_hf_config
from megatron_papo.models.rope_index import get_rope_index
from megatron_papo.models.specs import local_layer_spec
from megatron_papo.models.vlm import Qwen25VLModel, build_vlm, padded_vocab_size

__all__ = [
    "PRESETS", "Qwen25VLModel", "VLMSpec", "VisionSpec", "build_vlm", "get_preset", "get_rope_index",
    "local_layer_spec", "padded_vocab_size", "spec_from_hf_config",
]
