"""``megatron-papo generate`` end to end: HF tiny model -> hf-to-mcore checkpoint (+ tokenizer) -> greedy text
equal to transformers' greedy generate on the same weights."""

import shutil
import subprocess
import sys

import torch


def test_generate_command_matches_transformers(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.config import TokenizerConfig
    from megatron_papo.convert import hf_to_mcore
    from megatron_papo.data.image_processor import Qwen2VLImageProcessor
    from megatron_papo.data.prompts import encode_prompt
    from megatron_papo.data.tokenizer import build_tokenizer

    tok = build_tokenizer(TokenizerConfig(), cache_dir=tmp_path / "tok")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        image_token_id=tok.image_token_id, vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    shutil.copy(tok.path, tmp_path / "ckpt" / "tokenizer.model")

    question = "How many red squares?"
    ids = encode_prompt(tok, Qwen2VLImageProcessor(), question, []).input_ids[None]
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    if tok.eos_id in ref:
        ref = ref[:ref.index(tok.eos_id) + 1]
    out = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "generate", "--checkpoint",
                          str(tmp_path / "ckpt"), "--prompt", question, "--greedy", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip("\n") == tok.decode(ref), (out.stdout, tok.decode(ref))
    bad = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "generate", "--checkpoint",
                          str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a checkpoint" in bad.stderr
