"""Size presets: the published Qwen2.5-VL dimensions (from each checkpoint's Hugging Face config.json) and `tiny`.

A `VLMSpec` is the architecture only; parallel layout, dtype and layer implementation are chosen at build time.
`spec_from_hf_config` reads a Hugging Face `Qwen2_5_VLForConditionalGeneration` config.json into the same form,
so a converted checkpoint and a preset describe models the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class VisionSpec:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    # merger output width: the language model's hidden size
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # window attention side in pixels (112 px = 4x4 merged tokens)
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        """Flattened pixels per patch: channels * temporal * patch * patch (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class VLMSpec:
    family: ClassVar[str] = "qwen2.5-vl"
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # rotary half-dims for (temporal, height, width); sums to head_dim / 2
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision: VisionSpec = field(default_factory=VisionSpec)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model '{self.name}': hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model '{self.name}': num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"model '{self.name}': mrope_section {list(self.mrope_section)} must sum to "
                             f"head_dim/2 = {self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"model '{self.name}': vision.out_hidden_size {self.vision.out_hidden_size} must "
                             f"equal the language hidden_size {self.hidden_size}")
        if self.vision.hidden_size % (4 * self.vision.num_heads):
            raise ValueError(f"model '{self.name}': vision head_dim must be a multiple of 4 (2D rotary)")


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
    if name not in PRESETS:
        raise ValueError(f"model.preset '{name}' is unknown; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def spec_from_hf_config(cfg: dict, name: str = "hf") -> VLMSpec:
    """A VLMSpec from a Hugging Face Qwen2.5-VL config.json dict (transformers 4.x or 5.x layout)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in archs:
        raise ValueError(f"config.json describes model_type={cfg.get('model_type')!r} architectures={archs}; "
                         "only Qwen2.5-VL (model_type 'qwen2_5_vl') checkpoints are supported")
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    vis = cfg["vision_config"]
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    vision_rope = (vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    spec = VLMSpec(
        name=name, num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
        num_heads=text["num_attention_heads"], num_kv_heads=text.get("num_key_value_heads") or
        text["num_attention_heads"], intermediate_size=text["intermediate_size"], vocab_size=text["vocab_size"],
        tie_word_embeddings=tied, rms_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        image_token_id=cfg.get("image_token_id", 151655),
        vision_start_token_id=cfg.get("vision_start_token_id", 151652),
        vision=VisionSpec(
            depth=vis["depth"], hidden_size=vis["hidden_size"], num_heads=vis["num_heads"],
            intermediate_size=vis["intermediate_size"], out_hidden_size=vis["out_hidden_size"],
            patch_size=vis.get("patch_size", 14), temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2), in_channels=vis.get("in_channels", 3),
            window_size=vis.get("window_size", 112),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=float(vision_rope),
        ),
    )
    if vis.get("hidden_act", "silu") != "silu" or text.get("hidden_act", "silu") != "silu":
        raise ValueError("config.json: only hidden_act 'silu' is supported for Qwen2.5-VL")
    spec.validate()
    return spec
