"""Prompt encoding: question + images -> token ids with expanded image pads, pixel values and image grids.

Shapes: s = prompt tokens, P = image patches (all images), n = images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from megatron_papo.data.shards import SkipSample


@dataclass
class PromptInputs:
    """One encoded prompt; the masked-image variant has the same ``input_ids`` and grid, other pixels."""

    input_ids: torch.Tensor  # [s] int64
    pixel_values: Optional[torch.Tensor]  # [P, 1176] float32, None for text-only prompts
    image_grid_thw: Optional[torch.Tensor]  # [n, 3] int64, None for text-only prompts

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def expand_image_pads(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th ``image_token_id`` in ``ids`` by ``counts[i]`` copies (one per merged image patch)."""
    positions = [k for k, t in enumerate(ids) if t == image_token_id]
    if len(positions) != len(counts):
        raise ValueError(f"prompt holds {len(positions)} image placeholders but {len(counts)} images were given; "
                         f"questions must not contain the literal <|image_pad|> token")
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts):
        out.extend(ids[start:pos])
        out.extend([image_token_id] * count)
        start = pos + 1
    out.extend(ids[start:])
    return out


# inserted after the first character of a special token's text found in a question, so it tokenizes as plain text
ESCAPE = "\u2060"   # WORD JOINER: invisible, not whitespace


def escape_special_tokens(text: str, tokenizer=None) -> str:
    """Special-token strings typed inside data text (``<|image_pad|>``, ``<|im_end|>``...) become plain text: a
    question can neither add an image placeholder nor end its turn early."""
    from megatron_papo.data.tokenizer import SPECIAL_TOKENS

    specials = set(SPECIAL_TOKENS) | set(getattr(tokenizer, "special_texts", ()) or ())
    for tok in sorted(specials, key=len, reverse=True):
        if len(tok) > 1 and tok in text:
            text = text.replace(tok, tok[0] + ESCAPE + tok[1:])
    return text


def encode_prompt(tokenizer, processor, question: str, images: Sequence[Image.Image]) -> PromptInputs:
    """Chat-template the question (PAPO instruction included; special-token text in it escaped) for
    ``len(images)`` images and encode everything."""
    question = escape_special_tokens(question, tokenizer)
    ids = tokenizer.encode(tokenizer.chat_prompt(question, len(images)))
    if not images:
        expand_image_pads(ids, tokenizer.image_token_id, [])  # rejects a stray <|image_pad|> in the question
        return PromptInputs(torch.tensor(ids, dtype=torch.long), None, None)
    pixel_values, grid_thw = processor(list(images))  # [P, 1176], [n, 3]
    counts = (grid_thw.prod(dim=-1) // processor.merge_size ** 2).tolist()
    ids = expand_image_pads(ids, tokenizer.image_token_id, counts)
    return PromptInputs(torch.tensor(ids, dtype=torch.long), pixel_values, grid_thw)


class PromptEncoder:
    """Reader transform: adds ``sample["prompt"]`` (:class:`PromptInputs`); prompts longer than
    ``max_prompt_length`` tokens are dropped and counted as ``prompt_too_long``."""

    def __init__(self, tokenizer, processor, max_prompt_length: int):
        if max_prompt_length <= 0:
            raise ValueError(f"data.max_prompt_length must be > 0, got {max_prompt_length}")
        self.tokenizer, self.processor, self.max_prompt_length = tokenizer, processor, max_prompt_length

    def __call__(self, sample: dict) -> dict:
        prompt = encode_prompt(self.tokenizer, self.processor, sample["question"], sample["images"])
        if len(prompt) > self.max_prompt_length:
            raise SkipSample("prompt_too_long", f"{len(prompt)} tokens > data.max_prompt_length="
                                                f"{self.max_prompt_length}")
        sample["prompt"] = prompt
        return sample
