"""Token-count padding for FP8 GEMMs, and the rule for the vision tower.

Transformer Engine's FP8 GEMMs need the token dimension of every linear layer's input to be a multiple of 16
(32 for MXFP8): 8 for the forward GEMM, 16 because the weight-gradient GEMM reduces over tokens; megatron's
``get_fp8_align_size`` encodes the same numbers. The language model sees ``b x S`` tokens per micro-batch
(megatron's ``[S, b, h]`` layout), so micro-batches are right-padded to a sequence length ``S`` with
``b * S`` a multiple of that alignment. Right-padding never changes the loss: attention is causal, so positions
after a row's tokens do not affect them, and the loss gathers only response positions (``resp_index``).

Vision tower rule: it stays in the parameter dtype (bf16), never FP8. Its token count is the number of image
patches, which varies with every image's size, and its MLP width (Qwen2.5-VL: 3420) is not a multiple of 16, so
FP8 would need padded patches *and* padded weights for a tower that holds ~9% of a 7B model's parameters.

Generation cannot align its token counts, so the rollout engine runs an FP8 model in bf16 (:class:`fp8_off`).

The alignment is registered once when a model is built (:func:`configure`, from ``build_vlm``), like megatron's
parallel state; :func:`padded_seq_len` is the one call micro-batch builders make (``training.sequences.pack``,
and any other packer of token rows).

Legend: b rows in a micro-batch, S padded sequence length.
"""

from __future__ import annotations

_token_multiple = 1  # b * S must be a multiple of this (1: no FP8, no constraint)


def token_multiple(fp8: str | None, fp8_recipe: str) -> int:
    """Token-count alignment that ``fp8`` with ``fp8_recipe`` needs (1 without FP8)."""
    if fp8 is None:
        return 1
    return 32 if fp8_recipe == "mxfp8" else 16


def configure(fp8: str | None, fp8_recipe: str) -> int:
    """Register the alignment of the model being built; returns it."""
    global _token_multiple
    _token_multiple = token_multiple(fp8, fp8_recipe)
    return _token_multiple


def current_multiple() -> int:
    return _token_multiple


def padded_seq_len(seq_len: int, micro_batch_size: int, multiple: int | None = None) -> int:
    """Smallest ``S >= seq_len`` with ``micro_batch_size * S`` a multiple of ``multiple`` (the registered
    alignment when None)."""
    import math

    m = _token_multiple if multiple is None else multiple
    step = m // math.gcd(m, max(1, micro_batch_size))   # S must be a multiple of this
    return -(-seq_len // step) * step


class aligned:
    """``with aligned(16): ...`` registers an alignment for a block (tests and tools) and restores the previous."""

    def __init__(self, multiple: int):
        self.multiple = multiple

    def __enter__(self):
        global _token_multiple
        self._saved, _token_multiple = _token_multiple, self.multiple
        return self

    def __exit__(self, *exc):
        global _token_multiple
        _token_multiple = self._saved


class fp8_off:
    """``with fp8_off(model): ...`` runs a model built with FP8 in its parameter dtype (bf16) for the block.

    Generation cannot keep token counts aligned (prompts of any length, one token per row and step, rows finishing
    at different steps), so the rollout engine decodes in bf16; megatron reads ``config.fp8`` at every forward,
    and every layer shares the language model's config object. Without FP8 this does nothing."""

    def __init__(self, model):
        self.config = getattr(getattr(model, "language_model", None), "config", None)

    def __enter__(self):
        self._saved = getattr(self.config, "fp8", None)
        if self._saved is not None:
            self.config.fp8 = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.config.fp8 = self._saved
