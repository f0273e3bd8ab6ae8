"""A user's Qwen3-VL path end to end on a tiny model: a Hugging Face Qwen3-VL Thinking checkpoint with its files
as published (tokenizer.json / tokenizer_config.json with the chat template, preprocessor_config.json) ->
tools/convert_checkpoint.py hf-to-mcore -> `megatron-papo generate` (greedy, one image) token for token equal to
transformers' `Qwen3VLForConditionalGeneration.generate` on the prompt transformers itself builds ->
`megatron-papo evaluate --perception` writes a sane JSON -> a one-step `megatron-papo train` from it (model.load).

The reference prompt comes from transformers alone: the tokenizer's `apply_chat_template` (the checkpoint's own
Thinking template, so the prompt ends with `<think>\\n`) and the image processor read from
preprocessor_config.json, whose pixel range (here small) is not megatron_papo's default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 16   # the checkpoint's processor range (default: 65536 .. 16777216)
QUESTION = "How many shapes are there?"
NEW_TOKENS = 6

# A Thinking chat template in the published Qwen3-VL layout (whitespace-trimmed `{%- %}` blocks, no default
# system turn, images before the text of a user turn, tools and video left out); the generation prompt opens
# the think block.
THINKING_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for part in message.content %}
                {%- if part.type == 'image' or 'image' in part %}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
                {%- elif 'text' in part %}
                    {{- part.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}
"""


def _user_files(out: Path) -> dict:
    """Tokenizer (byte-level BPE with Qwen3's special tokens; <think> / </think> ordinary added tokens, one id
    each) with its chat template, and the image processor's preprocessor_config.json, as a download has them."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = THINKING_TEMPLATE           # where the published files keep it
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=16,
                             temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(out)
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def _hf_model(out: Path, ids: dict):
    """The tiny random Qwen3-VL of hf_tiny with this tokenizer's ids, vocabulary padded past the tokenizer's."""
    from transformers import Qwen3VLForConditionalGeneration

    from hf_tiny import _random_model, tiny_qwen3_config

    cfg = tiny_qwen3_config()
    cfg.text_config.vocab_size = 320
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    cfg.text_config.eos_token_id = ids["<|im_end|>"]
    return _random_model(Qwen3VLForConditionalGeneration, cfg, str(out), seed=3)


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(hf dir, converted dir, the HF model, the picture) after tools/convert_checkpoint.py hf-to-mcore."""
    root = tmp_path_factory.mktemp("qwen3_e2e")
    hf, mcore = root / "hf", root / "mcore"
    model = _hf_model(hf, _user_files(hf))
    assert load_tool("convert_checkpoint").main(["hf-to-mcore", "--hf", str(hf), "--out", str(mcore)]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(root / "picture.png")
    return hf, mcore, model, root / "picture.png"


def _reference(hf: Path, model, picture: Path) -> tuple:
    """(prompt ids, greedy new ids) from transformers alone: its tokenizer's chat template, its processor's pixels
    and grid (from preprocessor_config.json), Qwen3VLForConditionalGeneration.generate."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from megatron_papo.data.tokenizer import papo_user_text

    tok = AutoTokenizer.from_pretrained(hf)
    proc = Qwen2VLImageProcessorPil.from_pretrained(hf)
    pix = proc(images=[Image.open(picture).convert("RGB")], return_tensors="pt")
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                    "text": papo_user_text(QUESTION)}]}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n") and not text.startswith("<|im_start|>system")
    pads = int(pix["image_grid_thw"].prod()) // 4
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * pads), add_special_tokens=False)["input_ids"]
    ids_t = torch.tensor([ids])
    # transformers' processor returns mm_token_type_ids (1 on image pads) with the ids; M-RoPE needs them
    mm = (ids_t == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    with torch.no_grad():
        out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=mm, do_sample=False,
                             max_new_tokens=NEW_TOKENS,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    return ids, new, tok


def test_generate_matches_transformers(converted):
    hf, mcore, model, picture = converted
    ids, new, tok = _reference(hf, model, picture)
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 6  # 70x100 px -> 64x96 in the checkpoint's range
    out = _run(["-m", "megatron_papo.cli", "generate", "--checkpoint", mcore, "--prompt", QUESTION, "--image",
                picture, "--greedy", "--max-new-tokens", NEW_TOKENS], hf.parent)
    assert out.stdout.rstrip("\n") == tok.decode(new, skip_special_tokens=True)
    assert f"[{len(new)} tokens," in out.stderr


def test_evaluate_with_perception_writes_json(converted, tmp_path):
    hf, mcore, _, _ = converted
    assert load_tool("make_synthetic_shards").main(["--out", str(tmp_path / "shards"), "--num-samples", "3",
                                                    "--samples-per-shard", "2"]) == 0
    _run(["-m", "megatron_papo.cli", "evaluate", "--checkpoint", mcore, "--data", tmp_path / "shards", "--k", "2",
          "--max-new-tokens", "4", "--perception", "--out", tmp_path / "eval.json", "--no-progress"], tmp_path)
    res = json.loads((tmp_path / "eval.json").read_text())
    s, overall = res["settings"], res["datasets"]["overall"]
    assert (s["min_pixels"], s["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS), "the checkpoint's processor range"
    assert overall["questions"] == 3 and len(res["records"]) == 3 and res["skipped"]["count"] == 0
    for key in ("avg@k", "avg@k_masked", "avg@k_blank", "format", "truncation"):
        assert 0.0 <= overall[key] <= 1.0, key
    assert overall["kl_exact"] >= 0.0 and np.isfinite(overall["kl_k3"])
    assert all(r["tokens"] >= 2 for r in res["records"])  # every question answered k=2 times


def test_train_from_converted_checkpoint(converted, tmp_path):
    hf, mcore, _, _ = converted
    assert load_tool("make_synthetic_shards").main(["--out", str(tmp_path / "shards"), "--num-samples", "4"]) == 0
    sets = ["model.preset=qwen3-vl-tiny", f"model.load={mcore}", "data.tokenizer.type=huggingface",
            f"data.tokenizer.path={mcore}", "data.train_shards=shards", "data.synthetic_if_missing=false",
            f"data.min_pixels={MIN_PIXELS}", f"data.max_pixels={MAX_PIXELS}", "data.shuffle_buffer=0",
            "training.warmup_sft_steps=0", "rollout.n=2", "rollout.max_new_tokens=4", "training.rl_steps=1",
            "training.prompts_per_step=2", "training.prompts_per_update=2", "training.micro_batch_size=4",
            "checkpoint.dir=ckpt", "checkpoint.save_interval=1", "logging.tensorboard_dir=null",
            "logging.progress=false"]
    out = _run(["-m", "megatron_papo.cli", "train", "--config", ROOT / "examples/tiny_cpu.yaml",
                *[a for s in sets for a in ("--set", s)]], tmp_path)
    assert "step 1/1" in out.stdout and (tmp_path / "ckpt/step_1/metadata.json").is_file()


def test_checkpoint_files_decide_processor_and_template(tmp_path):
    """preprocessor_config.json in either spelling of the pixel range, a patch size of the wrong family refused
    with one line; a chat template kept only in the processor's chat_template.json is still the one used."""
    from megatron_papo.data.tokenizer import HFTokenizer
    from megatron_papo.models import family_of_preset
    from megatron_papo.training.loading import converted_processor

    qwen3, qwen25 = family_of_preset("qwen3-vl-tiny"), family_of_preset("tiny")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056,
                                                                   "patch_size": 14, "merge_size": 2}))
    proc = converted_processor(tmp_path, qwen25)
    assert (proc.min_pixels, proc.max_pixels, proc.patch_size) == (3136, 12845056, 14)
    with pytest.raises(ValueError, match="patch_size=14 but a qwen3-vl model takes 16"):
        converted_processor(tmp_path, qwen3)
    (tmp_path / "preprocessor_config.json").unlink()
    default = converted_processor(tmp_path, qwen3)
    assert default.patch_size == 16 and default.min_pixels > MAX_PIXELS

    _user_files(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok/tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tok/tokenizer_config.json").write_text(json.dumps(cfg))
    assert HFTokenizer(tmp_path / "tok").response_prefix == ""           # no template: Qwen2.5-VL's layout
    (tmp_path / "tok/chat_template.json").write_text(json.dumps({"chat_template": THINKING_TEMPLATE}))
    tok = HFTokenizer(tmp_path / "tok")
    assert tok.response_prefix == "<think>\n" and not tok.chat_prompt("Q?", 1).startswith("<|im_start|>system")
