"""TransformerConfigs of a Qwen3VLSpec: the shared builders (``models.common.configs``) with Qwen3's options: the
language model with per-head q/k RMSNorm and no QKV bias, the vision tower with LayerNorm and a GELU-tanh MLP."""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.common import configs as common
from megatron_papo.models.qwen3_vl.spec import Qwen3VLSpec


def language_config(spec: Qwen3VLSpec, **kwargs) -> TransformerConfig:
    """Qwen3 attention: per-head RMSNorm on q and k, no QKV bias; otherwise the Qwen2.5-VL language config."""
    return common.language_config(spec, add_qkv_bias=False, qk_layernorm=True, **kwargs)


def vision_config(spec: Qwen3VLSpec, **kwargs) -> TransformerConfig:
    return common.vision_config(spec, spec.vision.layernorm_eps, normalization="LayerNorm", gated_linear_unit=False,
                                activation_func=partial(F.gelu, approximate="tanh"), **kwargs)


def check_tp_divisibility(spec: Qwen3VLSpec, tp: int) -> None:
    """ValueError naming the dimension that the tensor-parallel size does not divide."""
    v = spec.vision
    common.check_tp_divisibility(spec, tp, **{"vision merger width": v.hidden_size * v.spatial_merge_size ** 2})
