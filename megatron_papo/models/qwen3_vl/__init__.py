"""Qwen3-VL dense on megatron-core: spec and presets, layer specs (interleaved M-RoPE, DeepStack layers), the
vision tower with learned positions and DeepStack mergers, the composition, and the checkpoint name map."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_papo.models.qwen3_vl.configs import check_tp_divisibility
from megatron_papo.models.qwen3_vl.model import Qwen3VLModel
from megatron_papo.models.qwen3_vl.spec import (FAMILY, PRESETS, Qwen3VisionSpec, Qwen3VLSpec, get_preset,
                                                spec_from_hf_config)

__all__ = ["FAMILY", "PRESETS", "Qwen3VLModel", "Qwen3VLSpec", "Qwen3VisionSpec", "build", "get_preset",
           "spec_from_hf_config"]


def build(spec: Qwen3VLSpec, *, transformer_impl: str, fp8: str | None, fp8_recipe: str, params_dtype: torch.dtype,
          freeze_vision: bool, pre_process: bool, post_process: bool, recompute: bool,
          sequence_parallel: bool = False) -> Qwen3VLModel:
    """This rank's part of a Qwen3-VL model (parallel_state initialised, spec validated)."""
    check_tp_divisibility(spec, parallel_state.get_tensor_model_parallel_world_size())
    return Qwen3VLModel(spec, transformer_impl=transformer_impl, fp8=fp8, fp8_recipe=fp8_recipe,
                        params_dtype=params_dtype, freeze_vision=freeze_vision, pre_process=pre_process,
                        post_process=post_process, recompute=recompute, sequence_parallel=sequence_parallel)
