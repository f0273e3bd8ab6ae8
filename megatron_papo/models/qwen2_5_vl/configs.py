"""TransformerConfigs of a Qwen2.5-VL ``VLMSpec``: the language model (QKV bias, no q/k norm) and the vision tower
(RMSNorm, SwiGLU), both the shared builders of ``models.common.configs`` with their defaults."""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from megatron_papo.models.common import configs as common
from megatron_papo.models.common.configs import check_tp_divisibility, language_config

__all__ = ["check_tp_divisibility", "language_config", "vision_config"]


def vision_config(spec, **kwargs) -> TransformerConfig:
    return common.vision_config(spec, spec.vision.rms_eps, **kwargs)
