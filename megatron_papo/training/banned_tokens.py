"""Tokens the policy must never emit: the vision special tokens.

A sampled ``<|image_pad|>`` in a response would make the next forward expect image features it does not have,
and ``<|vision_start|>`` / ``<|vision_end|>`` are meaningless outside a prompt. The policy's distribution is
therefore defined over the other tokens only: a forward hook sets their logits to -inf on the last pipeline
stage, for generation and for training alike, so sampling and scoring see the same distribution (the ops give
-inf entries zero probability and zero gradient).
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core import parallel_state


def vision_token_ids(tokenizer) -> list[int]:
    return sorted({tokenizer.image_token_id, tokenizer.vision_start_id, tokenizer.vision_end_id})


def ban_tokens(vlm, token_ids: Iterable[int]):
    """Mask ``token_ids`` in ``vlm``'s output logits (last stage); returns the hook handle (``.remove()``)."""
    ids = torch.tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)
    full = vlm.padded_vocab_size

    def hook(module, args, out):
        if not module.post_process or not ids.numel():
            return out
        width = out.shape[-1]                                   # V/tp (vocab-parallel) or V (gathered)
        start = 0 if width == full else parallel_state.get_tensor_model_parallel_rank() * width
        local = ids[(ids >= start) & (ids < start + width)] - start
        if not local.numel():
            return out
        return out.index_fill(-1, local.to(out.device), float("-inf"))   # out of place: autograd-safe

    return vlm.register_forward_hook(hook)
