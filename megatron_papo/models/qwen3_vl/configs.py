"""TransformerConfigs of a Qwen3VLSpec: the language model (Qwen3 attention) and the vision tower (LayerNorm,
GELU-tanh MLP, biases everywhere). Parallel sizes come from megatron's parallel_state; the vision tower is never
pipelined."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.configs import _common
from megatron_papo.models.configs import language_config as base_language_config
from megatron_papo.models.qwen3_vl.spec import Qwen3VLSpec


def language_config(spec: Qwen3VLSpec, **kwargs) -> TransformerConfig:
    """Qwen3 attention: per-head RMSNorm on q and k, no QKV bias; otherwise the Qwen2.5-VL language config."""
    return base_language_config(spec, add_qkv_bias=False, qk_layernorm=True, **kwargs)


def vision_config(spec: Qwen3VLSpec, *, params_dtype=torch.float32, fp8: str | None = None,
                  fp8_recipe: str = "delayed", recompute: bool = False) -> TransformerConfig:
    v = spec.vision
    common = _common(params_dtype, fp8, fp8_recipe, recompute)
    common.update(normalization="LayerNorm", gated_linear_unit=False,
                  activation_func=partial(F.gelu, approximate="tanh"))
    return TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads, ffn_hidden_size=v.intermediate_size, kv_channels=v.hidden_size // v.num_heads,
        layernorm_epsilon=v.layernorm_eps, add_bias_linear=True, add_qkv_bias=True, pipeline_model_parallel_size=1,
        **common,
    )


def check_tp_divisibility(spec: Qwen3VLSpec, tp: int) -> None:
    """ValueError naming the dimension that the tensor-parallel size does not divide."""
    v = spec.vision
    dims = {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
            "intermediate_size": spec.intermediate_size, "vision.num_heads": v.num_heads,
            "vision.intermediate_size": v.intermediate_size,
            "vision merger width": v.hidden_size * v.spatial_merge_size ** 2}
    for name, value in dims.items():
        if value % tp:
            raise ValueError(f"model '{spec.name}': {name}={value} is not divisible by tensor parallel size {tp}")
