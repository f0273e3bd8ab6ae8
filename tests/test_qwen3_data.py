"""Qwen3-VL data path: the family's image processor against transformers' (bit-identical pixel_values and grids),
``<think>`` handling for Instruct vs Thinking chat templates, and the family's PAPO masking cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

hf_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

# Qwen3-VL's published preprocessor_config.json: patch 16, merge 2, temporal 2, mean = std = 0.5,
# size {shortest_edge: 65536, longest_edge: 16777216} (min / max pixels).
QWEN3_PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                       image_std=[0.5, 0.5, 0.5])


def _image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr, mode=mode)


@pytest.mark.parametrize("limits", [(None, None), (32 * 32, 32 * 32 * 64)])
def test_image_processor_bit_identical_to_transformers(limits):
    from megatron_papo.models import family_of_preset

    images = [_image(100, 37, seed=1), _image(333, 517, seed=2), _image(20, 20, seed=3),
              _image(64, 96, "RGBA", seed=4), _image(40, 900, seed=5)]
    ours = family_of_preset("qwen3-vl-8b").image_processor(*limits)
    min_px, max_px = limits[0] or 65536, limits[1] or 16777216
    ref = hf_mod.Qwen2VLImageProcessorPil(size={"shortest_edge": min_px, "longest_edge": max_px}, **QWEN3_PROCESSOR)
    out = ref(images=images, return_tensors="np")
    pv, grid = ours(images)
    assert torch.equal(grid, torch.from_numpy(np.asarray(out["image_grid_thw"])))
    assert pv.shape[1] == 3 * 2 * 16 * 16 and torch.equal(pv, torch.from_numpy(np.asarray(out["pixel_values"])))


THINKING_TAIL = "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
INSTRUCT_TAIL = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# The parts of Qwen3-VL's published chat templates that shape a PAPO prompt: no default system turn, images
# before the text of a user turn, and the generation prompt (Thinking checkpoints open the think block there).
QWEN3_TURNS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def _hf_tokenizer(path, template: str) -> str:
    """A tiny byte-level BPE tokenizer with Qwen3's special tokens; <think> / </think> are ordinary added tokens
    (as in the Qwen3 tokenizer files), one id each."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|image_pad|>"]})
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN3_TURNS + template
    tok.save_pretrained(path)
    return str(path)


def test_think_handling_instruct_vs_thinking(tmp_path):
    from megatron_papo.data.tokenizer import HFTokenizer
    from megatron_papo.rewards import math_reward

    thinking = HFTokenizer(_hf_tokenizer(tmp_path / "thinking", THINKING_TAIL))
    instruct = HFTokenizer(_hf_tokenizer(tmp_path / "instruct", INSTRUCT_TAIL))
    assert thinking.response_prefix == "<think>\n" and instruct.response_prefix == ""
    prompt = thinking.chat_prompt("What is 1+1?", 1)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is 1+1?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert instruct.chat_prompt("What is 1+1?", 1).endswith("<|im_start|>assistant\n")

    # a Thinking model continues inside the opened block: the reward sees the opener
    ids = thinking.encode("1 and 1 make 2.</think> \\boxed{2}")
    assert math_reward(thinking.response_text(ids), "2") == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
    assert math_reward(thinking.decode(ids), "2")["format"] == 0.0  # without it the format term would be lost
    # an Instruct model writes the tags itself; they are single ids and decode keeps them
    ids = instruct.encode("<think>1 and 1 make 2.</think> \\boxed{2}")
    assert ids.count(instruct._tok.convert_tokens_to_ids("<think>")) == 1
    assert math_reward(instruct.response_text(ids), "2")["format"] == 1.0


def test_masking_cells_follow_the_family():
    from megatron_papo.algorithms.masking import masking_options
    from megatron_papo.algorithms.presets import algorithm_preset
    from megatron_papo.models import family_of_preset

    cfg = algorithm_preset("papo_g")
    proc = family_of_preset("qwen3-vl-4b").image_processor()
    assert masking_options(cfg, None, proc.patch_size, proc.merge_size)["patch_size"] == 16
    merged = algorithm_preset("papo_g", mask_on_merged_grid=True)
    opts = masking_options(merged, torch.tensor([[1, 4, 6]]), proc.patch_size, proc.merge_size)
    assert opts["patch_size"] == 32 and opts["target_sizes"] == [(64, 96)]
    assert masking_options(cfg)["patch_size"] == 14  # Qwen2.5-VL's
