"""Qwen3-VL dense architecture: `Qwen3VLSpec`, the published size presets and the Hugging Face config reader.

Dimensions of the presets are those of the published `Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct` config.json files
(the Thinking checkpoints share them). Field names follow `VLMSpec` (Qwen2.5-VL) wherever the meaning is the
same (the shared fields and their checks are ``models.common.spec``'s), so code that reads a spec (vocabulary,
image token ids, merge size, hidden size) serves both families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megatron_papo.models.common import spec as common

FAMILY = "qwen3-vl"


@dataclass(frozen=True)
class Qwen3VisionSpec(common.TowerSpec):
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    out_hidden_size: int = 4096
    patch_size: int = 16
    # learned position table: a square grid of side sqrt(num_position_embeddings), resampled to each image
    num_position_embeddings: int = 2304
    # vision blocks whose outputs feed the deepstack mergers (added after LM layers 0, 1, ...)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    layernorm_eps: float = 1e-6

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings ** 0.5)


@dataclass(frozen=True)
class Qwen3VLSpec(common.LanguageSpec):
    family: ClassVar[str] = FAMILY
    # Qwen3 sets the head width explicitly (num_heads * head_dim may differ from hidden_size)
    head_dim: int = field(kw_only=True)
    rope_theta: float = 5_000_000.0
    # rotary frequencies given to (temporal, height, width), interleaved t,h,w,t,h,w,...; sums to head_dim / 2
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    vision: Qwen3VisionSpec = field(default_factory=Qwen3VisionSpec)

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    def validate(self) -> None:
        super().validate()
        v = self.vision
        if v.num_grid_per_side ** 2 != v.num_position_embeddings:
            raise ValueError(f"model '{self.name}': vision.num_position_embeddings {v.num_position_embeddings} "
                             "must be a square (a side x side position grid)")
        bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
        if bad or self.num_deepstack > self.num_layers:
            raise ValueError(f"model '{self.name}': vision.deepstack_visual_indexes {list(v.deepstack_visual_indexes)}"
                             f" must name vision blocks (0..{v.depth - 1}), at most one per language layer")


def _qwen3(name, hidden, layers, heads, inter, tied, vdepth, vhidden, vinter, deepstack) -> Qwen3VLSpec:
    vision = Qwen3VisionSpec(depth=vdepth, hidden_size=vhidden, intermediate_size=vinter, out_hidden_size=hidden,
                             deepstack_visual_indexes=deepstack)
    return Qwen3VLSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=8,
                       head_dim=128, intermediate_size=inter, vocab_size=151936, tie_word_embeddings=tied,
                       vision=vision)


PRESETS: dict[str, Qwen3VLSpec] = {
    "qwen3-vl-tiny": Qwen3VLSpec(
        name="qwen3-vl-tiny", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=256, tie_word_embeddings=False, mrope_section=(2, 3, 3),
        max_position_embeddings=4096, rope_theta=10000.0,
        vision=Qwen3VisionSpec(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2)),
    ),
    "qwen3-vl-2b": _qwen3("qwen3-vl-2b", 2048, 28, 16, 6144, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-4b": _qwen3("qwen3-vl-4b", 2560, 36, 32, 9728, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-8b": _qwen3("qwen3-vl-8b", 4096, 36, 32, 12288, False, 27, 1152, 4304, (8, 16, 24)),
    "qwen3-vl-32b": _qwen3("qwen3-vl-32b", 5120, 64, 64, 25600, False, 27, 1152, 4304, (8, 16, 24)),
}


def is_qwen3_vl_config(cfg: dict) -> bool:
    return cfg.get("model_type") == "qwen3_vl" or "Qwen3VLForConditionalGeneration" in (cfg.get("architectures") or [])


def spec_from_hf_config(cfg: dict, name: str = "hf") -> Qwen3VLSpec:
    """A Qwen3VLSpec from a Hugging Face Qwen3-VL config.json dict."""
    if not is_qwen3_vl_config(cfg):
        raise ValueError(f"config.json describes model_type={cfg.get('model_type')!r}; expected 'qwen3_vl'")
    text, vis = cfg["text_config"], cfg["vision_config"]
    if common.hf_rope(text).get("mrope_interleaved") is False:
        raise ValueError("config.json: text_config rope mrope_interleaved=false is not Qwen3-VL's layout")
    if text.get("hidden_act", "silu") != "silu" or vis.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError("config.json: Qwen3-VL needs hidden_act 'silu' (text) and 'gelu_pytorch_tanh' (vision)")
    if text.get("attention_bias", False):
        raise ValueError("config.json: text_config.attention_bias=true is not Qwen3-VL's attention")
    vision = Qwen3VisionSpec(
        **common.hf_tower_fields(vis, Qwen3VisionSpec),
        num_position_embeddings=vis.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(vis.get("deepstack_visual_indexes", (8, 16, 24))))
    spec = Qwen3VLSpec(**common.hf_language_fields(cfg, text, Qwen3VLSpec, name), vision=vision,
                       head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    spec.validate()
    return spec


def hf_config_from_spec(spec: Qwen3VLSpec, dtype_name: str) -> dict:
    """A transformers Qwen3-VL config.json for a model that did not come from Hugging Face."""
    v = spec.vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": spec.image_token_id, "vision_start_token_id": spec.vision_start_token_id,
        "tie_word_embeddings": spec.tie_word_embeddings, "dtype": dtype_name,
        "text_config": {
            "model_type": "qwen3_vl_text", "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
            "intermediate_size": spec.intermediate_size, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
            "hidden_act": "silu", "rms_norm_eps": spec.rms_eps, "attention_bias": False,
            "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta,
                                "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
            "dtype": dtype_name,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size,
            "hidden_act": "gelu_pytorch_tanh", "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        },
    }


def spec_from_dict(d: dict) -> Qwen3VLSpec:
    """Inverse of ``dataclasses.asdict`` (checkpoint metadata)."""
    return common.spec_from_dict(Qwen3VLSpec, Qwen3VisionSpec, d, ("deepstack_visual_indexes",))


def get_preset(name: str, **overrides) -> Qwen3VLSpec:
    return common.lookup_preset(PRESETS, name, **overrides)
