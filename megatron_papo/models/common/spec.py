"""What the families' architecture specs share: the language-model and vision-tower fields (a family's spec
subclasses them, adds its own fields and re-declares the defaults that differ), their common validation, the
preset lookup, and the readers of a Hugging Face config.json's common fields and of checkpoint metadata.

Defaults here are Qwen2.5-VL's. A spec is the architecture only; parallel layout, dtype and layer implementation
are chosen at build time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TowerSpec:
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
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        """Flattened pixels per patch: channels * temporal * patch * patch (1176 for Qwen2.5-VL, 1536 Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class LanguageSpec:
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

    def validate(self) -> None:
        """ValueError naming the field: what both families require (a family adds its own checks)."""
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


def lookup_preset(presets: dict, name: str, **overrides):
    """A preset by name, with top-level fields replaced (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in presets:
        raise ValueError(f"model.preset '{name}' is unknown; choose one of {sorted(presets)}")
    return dataclasses.replace(presets[name], **overrides)


def _default(spec_type: type, name: str):
    f = spec_type.__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def hf_rope(text: dict) -> dict:
    """The language model's rotary settings (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
    return text.get("rope_scaling") or text.get("rope_parameters") or {}


def hf_language_fields(cfg: dict, text: dict, spec_type: type, name: str) -> dict:
    """The ``LanguageSpec`` fields of a Hugging Face config.json (``text``: its text part); what the file leaves
    out takes ``spec_type``'s default."""
    rope = hf_rope(text)
    return dict(
        name=name, num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
        num_heads=text["num_attention_heads"],
        num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        intermediate_size=text["intermediate_size"], vocab_size=text["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        rms_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", _default(spec_type, "rope_theta")))),
        mrope_section=tuple(rope.get("mrope_section", _default(spec_type, "mrope_section"))),
        max_position_embeddings=text.get("max_position_embeddings", _default(spec_type, "max_position_embeddings")),
        image_token_id=cfg.get("image_token_id", 151655),
        vision_start_token_id=cfg.get("vision_start_token_id", 151652),
    )


def hf_tower_fields(vis: dict, tower_type: type) -> dict:
    """The ``TowerSpec`` fields of a config.json's ``vision_config``."""
    return dict(
        depth=vis["depth"], hidden_size=vis["hidden_size"], num_heads=vis["num_heads"],
        intermediate_size=vis["intermediate_size"], out_hidden_size=vis["out_hidden_size"],
        patch_size=vis.get("patch_size", _default(tower_type, "patch_size")),
        temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
        in_channels=vis.get("in_channels", 3),
        rope_theta=float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )


def spec_from_dict(spec_type: type, tower_type: type, d: dict, tower_tuples: tuple[str, ...]):
    """Inverse of ``dataclasses.asdict`` (checkpoint metadata); ``tower_tuples``: the vision fields held as tuples."""
    d = dict(d)
    v = dict(d.pop("vision"))
    v.update({k: tuple(v[k]) for k in tower_tuples})
    return spec_type(**{**d, "mrope_section": tuple(d["mrope_section"]), "vision": tower_type(**v)})
