"""Layer specs: which implementation fills each slot of a transformer layer, chosen once at build time.

`local` runs anywhere (megatron's local layers with core attention on torch SDPA); `transformer_engine` uses
megatron's Transformer Engine layers (fused norm+linear, FP8-capable) and needs TE and a GPU. The vision towers
keep SDPA core attention in both: their (window or per-image) attention needs arbitrary block-diagonal masks.
A family picks its options (q/k norm in the language layers, the vision tower's norm), never a layer class.

Norms: without apex or Transformer Engine megatron falls back to ``WrappedTorchNorm`` (torch LayerNorm/RMSNorm),
which refuses sequence parallelism only because it does not tag its weights for the gradient sum over
tensor-parallel ranks; :class:`TorchNorm` is the same torch norm with the tag, swapped in wherever the fallback
would be used (apex's and TE's norms are kept: they tag their weights themselves).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

from megatron_papo.models.common.attention import RopeCachingSelfAttention, SDPAttention

TRANSFORMER_IMPLS = ("local", "transformer_engine")


class TorchNorm:
    """torch LayerNorm/RMSNorm (``config.normalization``), as megatron's ``WrappedTorchNorm`` builds it, with its
    parameters tagged ``sequence_parallel``: under sequence parallelism each tensor-parallel rank normalises part
    of the sequence, and megatron's ``finalize_model_grads`` sums tagged gradients over the ranks."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms or config.layernorm_zero_centered_gamma:
            return WrappedTorchNorm(config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def with_torch_norms(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` with :class:`TorchNorm` wherever megatron chose its torch fallback (in place; returned)."""
    sub, attn = spec.submodules, spec.submodules.self_attention.submodules
    for owner, name in ((sub, "input_layernorm"), (sub, "pre_mlp_layernorm"), (attn, "q_layernorm"),
                        (attn, "k_layernorm")):
        if getattr(owner, name, None) is WrappedTorchNorm:
            setattr(owner, name, TorchNorm)
    return spec


def block_norm():
    """The final norm of a language block: megatron's choice, with :class:`TorchNorm` for its torch fallback."""
    return TorchNorm if LayerNormImpl is WrappedTorchNorm else LayerNormImpl


def local_layer_spec(qk_layernorm: bool = False, normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron's local GPT layer with SDPA core attention (runs on CPU and GPU without Transformer Engine).

    Self-attention is ``RopeCachingSelfAttention``: megatron's module, plus rotated-key caching for inference
    contexts that opt in (the rollout engine); the parameters and every other path are megatron's.
    """
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    spec.submodules.self_attention.module = RopeCachingSelfAttention
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return with_torch_norms(spec)


def te_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """megatron's Transformer Engine GPT layer (FP8 follows TransformerConfig.fp8 / fp8_recipe)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def check_transformer_impl(transformer_impl: str, fp8: str | None, fp8_recipe: str = "delayed") -> None:
    """Raise a ValueError when the requested implementation cannot run here (never fall back silently); an FP8
    recipe the GPU's generation cannot run is named with that generation (platform.gpu)."""
    from megatron_papo.platform import fp8_available, has_gpu
    from megatron_papo.platform.gpu import check_fp8_recipe

    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl '{transformer_impl}' is unknown; use one of {TRANSFORMER_IMPLS}")
    if fp8 is not None and transformer_impl != "transformer_engine":
        raise ValueError(f"model.fp8={fp8!r} needs model.transformer_impl=transformer_engine "
                         "(the local spec has no FP8 kernels); set both or set model.fp8=null")
    if fp8 is not None:
        ok, why = fp8_available()
        if not ok:
            raise ValueError(f"model.fp8={fp8!r} cannot run here: {why}; set model.fp8=null")
        check_fp8_recipe(fp8_recipe)
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError as e:
            raise ValueError("model.transformer_impl=transformer_engine needs Transformer Engine "
                             "(an NGC PyTorch container, or README section 'GPU' for installing it); "
                             "use transformer_impl=local without it") from e
        if not has_gpu():
            raise ValueError("model.transformer_impl=transformer_engine needs a GPU; use transformer_impl=local")


def language_layer_spec(transformer_impl: str, qk_layernorm: bool = False) -> ModuleSpec:
    """A decoder layer; ``qk_layernorm``: per-head RMSNorm on q and k (Qwen3)."""
    if transformer_impl == "transformer_engine":
        return te_layer_spec(qk_layernorm)
    return local_layer_spec(qk_layernorm=qk_layernorm)


def language_block_spec(transformer_impl: str, num_layers: int) -> TransformerBlockSubmodules:
    """This pipeline stage's ``num_layers`` language layers and the block's final norm (:func:`block_norm`)."""
    return TransformerBlockSubmodules(layer_specs=[language_layer_spec(transformer_impl)] * num_layers,
                                      layer_norm=block_norm())


def vision_layer_spec(transformer_impl: str, normalization: str = "RMSNorm") -> ModuleSpec:
    """A vision block: the layer's spec with non-causal SDPA core attention (masks carry windows / images);
    ``normalization`` of the local spec (Transformer Engine's layer fuses its own norm)."""
    base = te_layer_spec() if transformer_impl == "transformer_engine" else local_layer_spec(
        normalization=normalization)
    spec = copy.deepcopy(base)
    attn = spec.submodules.self_attention
    attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.no_mask}
    attn.submodules.core_attention = SDPAttention
    return spec
