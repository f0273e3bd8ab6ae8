"""Model families by name: what differs between Qwen2.5-VL and Qwen3-VL, chosen once at build or load time.

A ``Family`` bundles the spec type and presets, the model class of this rank's part, the Hugging Face config
reader and writer, the checkpoint name map, the image processor, the masking cell, and the parameter and vision
FLOP counts. A new family is a folder beside ``qwen2_5_vl/`` and ``qwen3_vl/`` (built on ``common/``) plus an entry
in ``FAMILIES``. Callers look a family up by
preset name (``family_of_preset``), by spec (``family_of_spec``), by a Hugging Face config.json
(``family_of_hf_config``) or by the ``family`` recorded in checkpoint metadata (``get_family``; checkpoints
written before families existed are Qwen2.5-VL).

    model = build_vlm("qwen3-vl-tiny")          # any family's preset name, or a spec
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_papo.models import fp8_padding, qwen2_5_vl, qwen3_vl
from megatron_papo.models.common.specs import check_transformer_impl
from megatron_papo.models.qwen2_5_vl import counts as qwen25_counts
from megatron_papo.models.qwen2_5_vl import spec as qwen25_spec
from megatron_papo.models.qwen3_vl import counts as qwen3_counts
from megatron_papo.platform import device

LEGACY_FAMILY = qwen2_5_vl.FAMILY


@dataclass(frozen=True)
class Family:
    name: str
    spec_type: type
    presets: dict
    # this rank's part of the model: model_class(spec, **build options)
    model_class: type
    # (spec, tp) -> ValueError naming the dimension tp does not divide
    check_tp_divisibility: Callable
    is_hf_config: Callable[[dict], bool]
    spec_from_hf_config: Callable
    # (spec, dtype name) -> transformers config.json dict
    hf_config_from_spec: Callable
    spec_from_dict: Callable
    # () -> the family's megatron_papo.convert name-map module (name_map, expected_hf_shapes, hf_export_name)
    mapping: Callable
    # (min_pixels, max_pixels) -> image processor giving transformers' pixel_values and grids
    image_processor: Callable
    # raw-image cell of one vision patch in pixels (PAPO masking default; x spatial merge for merged cells)
    patch_size: int
    # (min, max) pixels of the published checkpoints' preprocessor_config.json (evaluate --protocol papo-eval)
    published_pixels: tuple[int, int]
    # the transformers class of the family's checkpoints
    hf_architecture: str
    # (spec, tp) -> parameters per rank of (one language layer, the vision tower), for --dry-run
    param_counts: Callable
    # (spec, grid_thw [n, 3]) -> forward FLOPs of the vision tower and its merger(s) (training.flops)
    vision_flops: Callable


def _processor(patch_size: int, mean, std, default_min: int, default_max: int):
    def make(min_pixels: int | None = None, max_pixels: int | None = None):
        from megatron_papo.data.image_processor import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(min_pixels=min_pixels or default_min, max_pixels=max_pixels or default_max,
                                     patch_size=patch_size, image_mean=mean, image_std=std)
    return make


def _mapping(module: str):
    def load():
        import importlib

        return importlib.import_module(module)
    return load


_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

FAMILIES: dict[str, Family] = {
    qwen2_5_vl.FAMILY: Family(
        name=qwen2_5_vl.FAMILY, spec_type=qwen2_5_vl.VLMSpec, presets=qwen2_5_vl.PRESETS,
        model_class=qwen2_5_vl.Qwen25VLModel, check_tp_divisibility=qwen2_5_vl.check_tp_divisibility,
        is_hf_config=qwen25_spec.is_hf_config, spec_from_hf_config=qwen2_5_vl.spec_from_hf_config,
        hf_config_from_spec=qwen25_spec.hf_config_from_spec, spec_from_dict=qwen25_spec.spec_from_dict,
        mapping=_mapping("megatron_papo.models.qwen2_5_vl.mapping"),
        image_processor=_processor(14, *_CLIP, 56 * 56, 28 * 28 * 1280), patch_size=14,
        published_pixels=(56 * 56, 28 * 28 * 16384),
        hf_architecture="Qwen2_5_VLForConditionalGeneration", param_counts=qwen25_counts.param_counts,
        vision_flops=qwen25_counts.vision_flops),
    qwen3_vl.FAMILY: Family(
        name=qwen3_vl.FAMILY, spec_type=qwen3_vl.Qwen3VLSpec, presets=qwen3_vl.PRESETS,
        model_class=qwen3_vl.Qwen3VLModel, check_tp_divisibility=qwen3_vl.check_tp_divisibility,
        is_hf_config=qwen3_vl.spec.is_qwen3_vl_config, spec_from_hf_config=qwen3_vl.spec_from_hf_config,
        hf_config_from_spec=qwen3_vl.spec.hf_config_from_spec, spec_from_dict=qwen3_vl.spec.spec_from_dict,
        mapping=_mapping("megatron_papo.models.qwen3_vl.mapping"),
        image_processor=_processor(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216), patch_size=16,
        published_pixels=(65536, 16777216),
        hf_architecture="Qwen3VLForConditionalGeneration", param_counts=qwen3_counts.param_counts,
        vision_flops=qwen3_counts.vision_flops),
}


def get_family(name: str | None) -> Family:
    """A family by name (None: a checkpoint from before families were recorded, i.e. Qwen2.5-VL)."""
    name = name or LEGACY_FAMILY
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_spec(spec) -> Family:
    return get_family(getattr(type(spec), "family", LEGACY_FAMILY))


def all_presets() -> dict:
    return {name: spec for f in FAMILIES.values() for name, spec in f.presets.items()}


def family_of_preset(name: str) -> Family:
    for f in FAMILIES.values():
        if name in f.presets:
            return f
    raise ValueError(f"model.preset '{name}' is unknown; choose one of {sorted(all_presets())}")


def get_preset(name: str, **overrides):
    """A preset of any family by name, with top-level fields replaced (e.g. ``vocab_size`` from the tokenizer)."""
    return dataclasses.replace(family_of_preset(name).presets[name], **overrides)


def family_of_hf_config(cfg: dict) -> Family:
    for f in FAMILIES.values():
        if f.is_hf_config(cfg):
            return f
    raise ValueError(f"config.json describes model_type={cfg.get('model_type')!r} architectures="
                     f"{cfg.get('architectures')}; supported: Qwen2.5-VL ('qwen2_5_vl') and Qwen3-VL ('qwen3_vl')")


def spec_from_hf_config(cfg: dict, name: str = "hf"):
    return family_of_hf_config(cfg).spec_from_hf_config(cfg, name=name)


def check_tp_divisibility(spec, tp: int) -> None:
    """ValueError naming the dimension of ``spec`` (any family) that the tensor-parallel size ``tp`` does not divide."""
    family_of_spec(spec).check_tp_divisibility(spec, tp)


def build_vlm(preset, *, vocab_size: int | None = None, image_token_id: int | None = None,
              vision_start_token_id: int | None = None, transformer_impl: str = "local", fp8: str | None = None,
              fp8_recipe: str = "delayed", params_dtype: torch.dtype = torch.float32, freeze_vision: bool = False,
              pre_process: bool | None = None, post_process: bool | None = None, recompute: bool = False,
              sequence_parallel: bool = False):
    """This rank's part of a VLM of any family (megatron parallel_state must be initialised), on this rank's device.

    ``preset``: a preset name or a spec; vocab_size / image_token_id / vision_start_token_id override it (the
    tokenizer decides them).
    """
    spec = get_preset(preset) if isinstance(preset, str) else preset
    overrides = {k: val for k, val in dict(vocab_size=vocab_size, image_token_id=image_token_id,
                                          vision_start_token_id=vision_start_token_id).items() if val is not None}
    spec = dataclasses.replace(spec, **overrides)
    spec.validate()
    check_transformer_impl(transformer_impl, fp8, fp8_recipe)
    check_tp_divisibility(spec, parallel_state.get_tensor_model_parallel_world_size())
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    fp8_padding.configure(fp8, fp8_recipe)      # micro-batches are padded to FP8's token alignment
    model = family_of_spec(spec).model_class(
        spec, transformer_impl=transformer_impl, fp8=fp8, fp8_recipe=fp8_recipe, params_dtype=params_dtype,
        freeze_vision=freeze_vision, pre_process=pre_process, post_process=post_process, recompute=recompute,
        sequence_parallel=sequence_parallel)
    return model.to(device())                    # built on the CPU (use_cpu_initialization), run on this rank's GPU
