"""Layer specs: which implementation fills each slot of a transformer layer, chosen once at build time."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_papo.models.attention import SDPAttention


def local_layer_spec(qk_layernorm: bool = False, normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron's local GPT layer with SDPA core attention (runs on CPU and GPU without Transformer Engine)."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
