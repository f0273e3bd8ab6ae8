"""Tiny random Hugging Face Qwen2.5-VL and Qwen3-VL models: the independent references the model, conversion and
rollout tests share."""

from __future__ import annotations

import torch

IMG, VSTART, VEND, VIDEO = 250, 249, 248, 251


def tiny_hf_config(tied: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-6, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND, video_token_id=VIDEO,
        tie_word_embeddings=tied,
    )


def _random_model(model_class, config, out_dir: str | None, seed: int):
    """``model_class(config)`` in fp32 with every tensor randomised, saved as safetensors in out_dir when given."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # HF zero/one-initialises biases and norms: randomise so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def make_hf_model(out_dir: str, seed: int = 0, tied: bool = False):
    """A tiny random HF Qwen2.5-VL saved as safetensors in out_dir (fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _random_model(Qwen2_5_VLForConditionalGeneration, tiny_hf_config(tied), out_dir, seed)


def tiny_qwen3_config(tied: bool = False, deepstack=(0, 1, 2)):
    """A tiny Qwen3-VL: 4 LM layers, 3 deepstack mergers (after LM layers 0-2: a PP2 split falls among them)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, rms_norm_eps=1e-6,
                         max_position_embeddings=512, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(deepstack)),
        image_token_id=IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND, video_token_id=VIDEO,
        tie_word_embeddings=tied,
    )


def make_qwen3_model(out_dir: str | None, seed: int = 0, tied: bool = False, deepstack=(0, 1, 2)):
    """A tiny random HF Qwen3-VL (fp32), saved as safetensors in out_dir when given."""
    from transformers import Qwen3VLForConditionalGeneration

    return _random_model(Qwen3VLForConditionalGeneration, tiny_qwen3_config(tied, deepstack), out_dir, seed)
