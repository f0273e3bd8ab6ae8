"""Qwen2.5-VL architecture: `VLMSpec`, the published size presets (from each checkpoint's Hugging Face
config.json) and `tiny`, the Hugging Face config reader and writer, and the checkpoint-metadata reader.

The fields both families share and their validation are ``models.common.spec``'s; here only what Qwen2.5-VL adds
(window attention in the vision tower) and its defaults. `spec_from_hf_config` reads a Hugging Face
`Qwen2_5_VLForConditionalGeneration` config.json into the same form, so a converted checkpoint and a preset
describe models the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megatron_papo.models.common import spec as common

FAMILY = "qwen2.5-vl"


@dataclass(frozen=True)
class VisionSpec(common.TowerSpec):
    # window attention side in pixels (112 px = 4x4 merged tokens)
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rms_eps: float = 1e-6


@dataclass(frozen=True)
class VLMSpec(common.LanguageSpec):
    family: ClassVar[str] = FAMILY
    vision: VisionSpec = field(default_factory=VisionSpec)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model '{self.name}': hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        super().validate()


def _qwen(name, hidden, layers, heads, kv, inter, vocab, tied, vision_inter) -> VLMSpec:
    vision = VisionSpec(intermediate_size=vision_inter, out_hidden_size=hidden)
    return VLMSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                   intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied, vision=vision)


PRESETS: dict[str, VLMSpec] = {
    "tiny": VLMSpec(
        name="tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=256, tie_word_embeddings=False, mrope_section=(2, 3, 3), max_position_embeddings=4096,
        vision=VisionSpec(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                          fullatt_block_indexes=(1,)),
    ),
    "qwen2.5-vl-3b": _qwen("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True, 3420),
    "qwen2.5-vl-7b": _qwen("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False, 3420),
    "qwen2.5-vl-32b": _qwen("qwen2.5-vl-32b", 5120, 64, 40, 8, 27648, 152064, False, 3456),
    "qwen2.5-vl-72b": _qwen("qwen2.5-vl-72b", 8192, 80, 64, 8, 29568, 152064, False, 3456),
}


def get_preset(name: str, **overrides) -> VLMSpec:
    """A preset by name, with top-level fields replaced (e.g. ``vocab_size`` from the tokenizer)."""
    return common.lookup_preset(PRESETS, name, **overrides)


def is_hf_config(cfg: dict) -> bool:
    return cfg.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in (
        cfg.get("architectures") or [])


def spec_from_hf_config(cfg: dict, name: str = "hf") -> VLMSpec:
    """A VLMSpec from a Hugging Face Qwen2.5-VL config.json dict (transformers 4.x or 5.x layout)."""
    if not is_hf_config(cfg):
        raise ValueError(f"config.json describes model_type={cfg.get('model_type')!r} architectures="
                         f"{cfg.get('architectures') or []}; only Qwen2.5-VL (model_type 'qwen2_5_vl') checkpoints "
                         "are supported")
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    vis = cfg["vision_config"]
    vision = VisionSpec(**common.hf_tower_fields(vis, VisionSpec), window_size=vis.get("window_size", 112),
                        fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))))
    spec = VLMSpec(**common.hf_language_fields(cfg, text, VLMSpec, name), vision=vision)
    if vis.get("hidden_act", "silu") != "silu" or text.get("hidden_act", "silu") != "silu":
        raise ValueError("config.json: only hidden_act 'silu' is supported for Qwen2.5-VL")
    spec.validate()
    return spec


def spec_from_dict(d: dict) -> VLMSpec:
    """Inverse of ``dataclasses.asdict`` (checkpoint metadata)."""
    return common.spec_from_dict(VLMSpec, VisionSpec, d, ("fullatt_block_indexes",))


def hf_config_from_spec(spec: VLMSpec, dtype_name: str) -> dict:
    """A transformers Qwen2.5-VL config.json for a model that did not come from Hugging Face."""
    v = spec.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "vocab_size": spec.vocab_size, "hidden_act": "silu",
        "rms_norm_eps": spec.rms_eps, "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tie_word_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "image_token_id": spec.image_token_id, "vision_start_token_id": spec.vision_start_token_id,
        "torch_dtype": dtype_name,
        "vision_config": {
            "model_type": "qwen2_5_vl", "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size, "hidden_act": "silu",
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": 2,
        },
    }
