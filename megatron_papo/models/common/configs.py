"""TransformerConfigs shared by the families: the options every config carries, the language model's config
(a family passes its attention options) and the vision tower's (a family passes its norm and MLP), and the
tensor-parallel divisibility check.

The parallel sizes come from megatron's parallel_state (initialise it first). A vision tower is never pipelined
(it lives whole on the first stage), so its config says pipeline size 1, and it never runs in FP8 (varying patch
counts; see ``models.fp8_padding``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig


def _common(params_dtype: torch.dtype, fp8: str | None, fp8_recipe: str, recompute: bool) -> dict:
    return dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        fp8=fp8, fp8_recipe=fp8_recipe if fp8 else "delayed",
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None, recompute_num_layers=1 if recompute else None,
    )


def language_config(spec, *, params_dtype=torch.float32, fp8: str | None = None, fp8_recipe: str = "delayed",
                    recompute: bool = False, sequence_parallel: bool = False, **attention) -> TransformerConfig:
    """The language model's config; ``attention``: the family's attention options (default Qwen2.5: QKV bias,
    no q/k norm; Qwen3-VL passes ``add_qkv_bias=False, qk_layernorm=True``). ``sequence_parallel`` splits the
    activations between tensor-parallel blocks along the sequence (the vision towers never do: their configs are
    separate and their window / per-image attention orders patches their own way)."""
    attention = {"add_qkv_bias": True, **attention}
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if spec.num_layers % pp:
        raise ValueError(f"model '{spec.name}' has {spec.num_layers} layers, not divisible by pipeline "
                         f"parallel size {pp}; choose a pp that divides it")
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads, ffn_hidden_size=spec.intermediate_size, kv_channels=spec.head_dim,
        layernorm_epsilon=spec.rms_eps, add_bias_linear=False, mrope_section=list(spec.mrope_section),
        pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel, **attention,
        **_common(params_dtype, fp8, fp8_recipe, recompute),
    )


def vision_config(spec, eps: float, *, params_dtype=torch.float32, recompute: bool = False,
                  **family) -> TransformerConfig:
    """The vision tower's config (biases everywhere, full attention heads); ``eps``: its norm's epsilon,
    ``family``: the family's norm / MLP options (default Qwen2.5: RMSNorm, SwiGLU)."""
    v = spec.vision
    common = {**_common(params_dtype, None, "delayed", recompute), **family}
    return TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads, ffn_hidden_size=v.intermediate_size, kv_channels=v.hidden_size // v.num_heads,
        layernorm_epsilon=eps, add_bias_linear=True, add_qkv_bias=True, pipeline_model_parallel_size=1, **common,
    )


def check_tp_divisibility(spec, tp: int, **extra: int) -> None:
    """ValueError naming the dimension that the tensor-parallel size does not divide (``extra``: the family's own
    dimensions, by name)."""
    dims = {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
            "intermediate_size": spec.intermediate_size, "vision.num_heads": spec.vision.num_heads,
            "vision.intermediate_size": spec.vision.intermediate_size, **extra}
    for name, value in dims.items():
        if value % tp:
            raise ValueError(f"model '{spec.name}': {name}={value} is not divisible by tensor parallel size {tp}")
