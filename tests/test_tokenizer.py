"""Tokenizers (sentencepiece demo model, local Hugging Face Qwen2 tokenizer) and prompt encoding.

References: the Qwen2-VL chat template rendered by Hugging Face's jinja machinery, and Hugging Face's
``Qwen2VLProcessor`` (text + images -> input_ids with expanded image pads) on a tiny tokenizer built here.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.config import TokenizerConfig
from megatron_papo.data.image_processor import Qwen2VLImageProcessor
from megatron_papo.data.prompts import encode_prompt
from megatron_papo.data.synthetic import synthetic_corpus
from megatron_papo.data.tokenizer import (PAPO_INSTRUCTION, SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer,
                                          build_tokenizer, qwen_chat_prompt)

# Qwen2-VL's chat template (the Qwen2.5-VL instruct checkpoints ship the same one).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return build_tokenizer(TokenizerConfig(), cache_dir=tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE Qwen2 tokenizer with Qwen's special tokens, saved as Hugging Face files."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "s")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(path)
    return path


def test_spm_special_tokens_are_single_ids(spm_tok):
    assert isinstance(spm_tok, SentencePieceTokenizer)
    for tok in SPECIAL_TOKENS:
        ids = spm_tok.encode(tok)
        assert len(ids) == 1, (tok, ids)
    assert spm_tok.encode("<|image_pad|>") == [spm_tok.image_token_id]
    assert spm_tok.encode("<|vision_start|>") == [spm_tok.vision_start_id]
    assert spm_tok.encode("<|im_end|>") == [spm_tok.eos_id]
    assert spm_tok.encode("<|endoftext|>") == [spm_tok.pad_id]
    assert len({spm_tok.eos_id, spm_tok.pad_id, spm_tok.image_token_id, spm_tok.vision_start_id,
                spm_tok.vision_end_id}) == 5
    assert 256 < spm_tok.vocab_size <= 512


def test_spm_round_trip_and_skip_special(spm_tok):
    text = "<think>I count 3 shapes.</think> \\boxed{3}<|im_end|>"
    ids = spm_tok.encode(text)
    assert spm_tok.decode(ids, skip_special_tokens=False) == text
    assert spm_tok.decode(ids) == "<think>I count 3 shapes.</think> \\boxed{3}"
    # byte fallback: text never seen in training (accents, symbols, newlines) still round-trips
    odd = "héllo ∑ 12\n\n  x"
    assert spm_tok.decode(spm_tok.encode(odd)) == odd
    prompt = spm_tok.chat_prompt("How many shapes are in the image?", 1)
    assert spm_tok.decode(spm_tok.encode(prompt), skip_special_tokens=False) == prompt
    # the demo corpus makes the fixed prompt compact
    assert len(spm_tok.encode(prompt)) < 90


def test_spm_cache_reuses_model_file(tmp_path):
    a = build_tokenizer(TokenizerConfig(vocab_size=400), corpus_texts=["a b c", "hello world"], cache_dir=tmp_path)
    files = list(tmp_path.glob("spm-*.model"))
    assert len(files) == 1 and a.path == str(files[0])
    mtime = files[0].stat().st_mtime_ns
    b = build_tokenizer(TokenizerConfig(vocab_size=400), corpus_texts=["a b c", "hello world"], cache_dir=tmp_path)
    assert b.path == a.path and files[0].stat().st_mtime_ns == mtime
    c = build_tokenizer(TokenizerConfig(vocab_size=400), corpus_texts=["other text"], cache_dir=tmp_path)
    assert c.path != a.path
    loaded = build_tokenizer(TokenizerConfig(path=a.path))
    assert loaded.encode("hello <think>") == a.encode("hello <think>")


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "nope.model")))
    with pytest.raises(ValueError, match="required for type huggingface"):
        build_tokenizer(TokenizerConfig(type="huggingface"))
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown"):
        build_tokenizer(TokenizerConfig(type="bpe"))
    with pytest.raises(ValueError, match="raise vocab_size"):
        build_tokenizer(TokenizerConfig(vocab_size=200), corpus_texts=["x"], cache_dir=tmp_path)


def test_chat_prompt_matches_hf_template(hf_dir, spm_tok):
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(hf_dir)))
    assert isinstance(tok, HFTokenizer)
    for n in (0, 1, 2):
        text = tok.chat_prompt("  What is 2+2? ", n)
        assert text == qwen_chat_prompt("What is 2+2?", n) == spm_tok.chat_prompt("What is 2+2?", n)
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == n
        assert text.endswith(f"What is 2+2? {PAPO_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")


def test_hf_tokenizer_ids(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(hf_dir)))
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.image_token_id == ref.convert_tokens_to_ids("<|image_pad|>")
    assert tok.vision_start_id == ref.convert_tokens_to_ids("<|vision_start|>")
    text = "<|im_start|>user\nthe sin<|image_pad|><|im_end|>"
    ids = tok.encode(text)
    assert ids.count(tok.image_token_id) == 1 and ids[0] == ref.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == "user\nthe sin"
    assert tok.decode(ids, skip_special_tokens=False) == text


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (120, 50)]]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_encode_prompt_matches_hf_processor_rule(hf_dir, num_images):
    """Reference: HF's Qwen2-VL processor rule (expand each pad in the *text* by grid.prod() // merge**2, then
    tokenize) with HF's image processor and tokenizer; ours expands in id space. (The HF processor object itself
    needs torchvision for its video half, absent here.)"""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(hf_dir)))
    proc = Qwen2VLImageProcessor(min_pixels=4 * 784, max_pixels=40 * 784)
    images = _images()[:num_images]
    ours = encode_prompt(tok, proc, "the sheet", images)
    text = tok.chat_prompt("the sheet", num_images)
    if num_images:
        ref_img = Qwen2VLImageProcessorPil(min_pixels=4 * 784, max_pixels=40 * 784)(images=images,
                                                                                    return_tensors="pt")
        for thw in ref_img["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(thw.prod()) // 4), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
        assert torch.equal(ours.image_grid_thw, ref_img["image_grid_thw"])
        torch.testing.assert_close(ours.pixel_values, ref_img["pixel_values"].float(), rtol=0, atol=0)
    else:
        assert ours.pixel_values is None and ours.image_grid_thw is None
    ref_ids = AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False)["input_ids"]
    assert ours.input_ids.tolist() == ref_ids
    assert ours.input_ids.dtype == torch.long


def test_encode_prompt_spm_and_masked_variant(spm_tok):
    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=84 * 84)
    img = _images()[0]
    real = encode_prompt(spm_tok, proc, "How many shapes are in the image?", [img])
    black = encode_prompt(spm_tok, proc, "How many shapes are in the image?", [Image.new("RGB", img.size)])
    assert torch.equal(real.input_ids, black.input_ids) and torch.equal(real.image_grid_thw, black.image_grid_thw)
    assert not torch.equal(real.pixel_values, black.pixel_values)
    ids = real.input_ids.tolist()
    n_pad = int(real.image_grid_thw.prod()) // 4
    start = ids.index(spm_tok.vision_start_id)
    assert ids[start + 1:start + 1 + n_pad] == [spm_tok.image_token_id] * n_pad
    assert ids[start + 1 + n_pad] == spm_tok.vision_end_id
    sneaky = encode_prompt(spm_tok, proc, "sneaky <|image_pad|>", [])   # typed special tokens stay text
    assert spm_tok.image_token_id not in sneaky.input_ids.tolist()


def test_tokenizer_contract_attributes(spm_tok, hf_dir):
    hf = build_tokenizer(TokenizerConfig(type="huggingface", path=str(hf_dir)))
    for tok in (spm_tok, hf):
        for name in ("vocab_size", "eos_id", "pad_id", "image_token_id", "vision_start_id", "vision_end_id"):
            assert isinstance(getattr(tok, name), int), name
        assert tok.eos_id in tok.stop_ids
    corpus = synthetic_corpus()
    assert any("\\boxed{" in t for t in corpus)


def test_hf_tokenizer_without_a_chat_template_says_so(hf_dir, tmp_path, caplog):
    """Files without any chat template: the Qwen2.5-VL layout is used and a warning names the files to copy."""
    import json
    import logging
    import shutil

    from megatron_papo.data.tokenizer import HFTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="megatron_papo.data.tokenizer"):
        tok = HFTokenizer(bare)
    assert "has no chat template" in caplog.text and "chat_template.json" in caplog.text
    assert tok.chat_prompt("q", 1) == qwen_chat_prompt("q", 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_papo.data.tokenizer"):
        HFTokenizer(hf_dir)
    assert "no chat template" not in caplog.text
