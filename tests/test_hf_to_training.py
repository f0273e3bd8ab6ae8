"""A user's path end to end on a tiny model: a Hugging Face Qwen2.5-VL checkpoint with its own (Hugging Face)
tokenizer -> tools/convert_checkpoint.py hf-to-mcore -> `megatron-papo train` from it (model.load) ->
`megatron-papo evaluate` on the converted checkpoint -> mcore-to-hf of both the converted and the trained
checkpoint, tokenizer included.

The tokenizer has fewer tokens than the checkpoint's vocabulary (as Qwen's 151,665 vs 151,936), so the model must
be built with the checkpoint's architecture, not the tokenizer's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _hf_checkpoint(out: Path) -> int:
    """Tiny byte-level BPE tokenizer with Qwen's special tokens + a tiny random HF model sized like `tiny`."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=400, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    return len(tok)


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_hf_checkpoint_to_training_and_back(tmp_path):
    hf, mcore, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    assert _hf_checkpoint(hf) < 384  # padded to 384 by our model; the checkpoint pads to 512
    _run([str(ROOT / "tools/convert_checkpoint.py"), "hf-to-mcore", "--hf", str(hf), "--out", str(mcore),
          "--tp", "1", "--pp", "1"], tmp_path)
    assert (mcore / "tokenizer.json").is_file(), "the tokenizer travels with the converted weights"
    _run([str(ROOT / "tools/make_synthetic_shards.py"), "--out", "shards", "--num-samples", "8"], tmp_path)
    sets = ["model.preset=tiny", "training.warmup_sft_steps=0", "data.max_prompt_length=1024", f"model.load={mcore}", "data.tokenizer.type=huggingface",
            f"data.tokenizer.path={hf}", "data.train_shards=shards", "data.synthetic_if_missing=false",
            "data.min_pixels=3136", "data.max_pixels=3136", "data.shuffle_buffer=0", "rollout.n=2",
            "rollout.max_new_tokens=4", "training.rl_steps=1", "training.prompts_per_step=2",
            "training.prompts_per_update=2", "training.micro_batch_size=4", "checkpoint.dir=ckpt",
            "checkpoint.save_interval=1", "logging.tensorboard_dir=null", "logging.progress=false"]
    from megatron_papo.config import load_config
    from megatron_papo.data import build_tokenizer
    from megatron_papo.training.trainer import model_spec

    cfg = load_config(ROOT / "examples/tiny_cpu.yaml", sets)
    spec = model_spec(cfg, build_tokenizer(cfg.data.tokenizer))
    # the checkpoint's architecture, not the tokenizer's size or the preset's RoPE base (tiny: 1e6)
    assert (spec.vocab_size, spec.rope_theta) == (400, 10000.0)
    with pytest.raises(ValueError, match="model.preset qwen2.5-vl-3b .* does not match the checkpoint"):
        model_spec(load_config(ROOT / "examples/tiny_cpu.yaml", sets + ["model.preset=qwen2.5-vl-3b"]),
                   build_tokenizer(cfg.data.tokenizer))
    out = _run(["-m", "megatron_papo.cli", "train", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
                *[a for s in sets for a in ("--set", s)]], tmp_path)
    assert "step 1/1" in out.stdout and (tmp_path / "ckpt/step_1/metadata.json").is_file()
    ev = _run(["-m", "megatron_papo.cli", "evaluate", "--checkpoint", str(mcore), "--data", "shards", "--k", "1",
               "--limit", "2", "--max-new-tokens", "4"], tmp_path)
    assert "avg@1" in ev.stdout
    _run([str(ROOT / "tools/convert_checkpoint.py"), "mcore-to-hf", "--mcore", str(mcore), "--out", str(back)],
         tmp_path)
    assert (back / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    # the trained policy goes back to Hugging Face straight from its training checkpoint
    trained = tmp_path / "trained_hf"
    _run([str(ROOT / "tools/convert_checkpoint.py"), "mcore-to-hf", "--mcore", "ckpt/step_1", "--out",
          str(trained)], tmp_path)
    from transformers import Qwen2_5_VLForConditionalGeneration

    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).state_dict()
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(trained).state_dict()
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "RL changed the weights"
    assert (trained / "tokenizer.json").is_file()
