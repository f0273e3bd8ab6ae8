"""Tokenizers: a small sentencepiece model trained for the demo, and Qwen2.5-VL's Hugging Face tokenizer files.

Both expose the same surface (``vocab_size``, ``eos_id``, ``pad_id``, ``image_token_id``, ``vision_start_id``,
``vision_end_id``, ``stop_ids``, ``encode``, ``decode``, ``chat_prompt``, ``response_prefix``, ``response_text``)
so the model, rollout and trainer never ask which one they have.

``<think>``: a Hugging Face checkpoint's own chat template decides. Qwen3-VL Thinking templates end the generation
prompt with ``<think>\n``, so the model's response starts inside the reasoning; ``response_prefix`` is that text
(read from the template) and ``response_text`` prepends it, so rewards see ``<think>...</think>...`` either way.
Instruct templates (Qwen2.5-VL, Qwen3-VL Instruct) open no think block: ``response_prefix`` is empty and the
PAPO instruction asks the model to write the tags itself (in Qwen3-VL Instruct they are ordinary added tokens,
one id each, kept by ``decode``). Special tokens written in text (``<|im_start|>``, ``<|image_pad|>``, ``<think>``...)
encode to their single ids.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
THINK_START, THINK_END = "<think>", "</think>"
# Order fixes the demo tokenizer's ids: 0 is <unk>, then these as 1..8.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, THINK_START, THINK_END)
# Dropped by decode(skip_special_tokens=True); the think tags stay because the format reward reads them.
_SKIPPABLE = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)

SYSTEM_PROMPT = "You are a helpful assistant."
# The reference PAPO implementation's math format prompt (EasyR1 ``math.jinja``), appended to the question.
PAPO_INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
                    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
                    "The final answer MUST BE put in \\boxed{}.")
# Bumping this invalidates cached demo tokenizers (change it whenever training settings below change).
_SPM_RECIPE = "bpe-identity-bytefallback-v1"


def papo_user_text(question: str) -> str:
    """The user turn's text: the question, then the PAPO instruction (docs/algorithm.md section 3)."""
    return f"{question.strip()} {PAPO_INSTRUCTION}"


def qwen_chat_prompt(question: str, num_images: int) -> str:
    """Qwen2.5-VL chat template text: system turn, user turn (images first, then the text), assistant opener."""
    images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{images}{papo_user_text(question)}{IM_END}\n"
            f"{IM_START}assistant\n")


class SentencePieceTokenizer:
    """A sentencepiece BPE model whose special tokens are user-defined symbols (one id each, matched in text)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        ids = {tok: self._sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i == self._sp.unk_id()]
        if missing:
            raise ValueError(f"sentencepiece model {self.path} lacks the special tokens {missing}; train it with "
                             f"build_tokenizer (data.tokenizer.path: null) or add them as user_defined_symbols")
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id, self.pad_id = ids[IM_END], ids[ENDOFTEXT]
        self.image_token_id, self.vision_start_id, self.vision_end_id = ids[IMAGE_PAD], ids[VISION_START], \
            ids[VISION_END]
        self.stop_ids = [ids[IM_END], ids[ENDOFTEXT]]
        self._skip = {ids[t] for t in _SKIPPABLE}

    @staticmethod
    def train(texts: Iterable[str], out_file: str | os.PathLike, vocab_size: int = 512) -> str:
        """Train on ``texts`` plus the chat template strings; write ``out_file`` atomically; return its path."""
        import sentencepiece as spm

        corpus = [t for t in texts if t] + [qwen_chat_prompt(q, n) for q, n in (("Question?", 0), ("Look.", 1))]
        proto = io.BytesIO()
        try:
            _train_spm(spm, corpus, proto, vocab_size)
        except RuntimeError as exc:
            raise ValueError(f"data.tokenizer.vocab_size={vocab_size}: sentencepiece training failed ({exc}); "
                             f"it needs room for 256 byte pieces, the special tokens and every character of the "
                             f"corpus: raise vocab_size") from exc
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(proto.getvalue())
        os.replace(tmp, out_file)
        return str(out_file)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip]
        return self._sp.decode(ids)

    def chat_prompt(self, question: str, num_images: int) -> str:
        return qwen_chat_prompt(question, num_images)

    # the demo template opens no think block
    response_prefix = ""

    def response_text(self, ids: Sequence[int]) -> str:
        """A response as the reward reads it."""
        return self.response_prefix + self.decode(ids)


def _train_spm(spm, corpus: list[str], proto: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, character_coverage=1.0,
        # identity + no whitespace folding: decode(encode(text)) == text, newlines of the template included.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
        bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, max_sentence_length=1 << 20, num_threads=1,
        minloglevel=2)


class HFTokenizer:
    """Qwen2.5-VL's Hugging Face tokenizer files (``tokenizer.json`` etc.) from a local directory."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise ValueError(f"data.tokenizer.path: Hugging Face tokenizer directory {path} does not exist; point "
                             f"it at the model directory holding tokenizer.json / tokenizer_config.json")
        self.path = str(path)
        self._tok = AutoTokenizer.from_pretrained(self.path)
        if not getattr(self._tok, "chat_template", None):
            self._tok.chat_template = processor_chat_template(Path(path))
        if not self._tok.chat_template:  # said once: a Qwen3-VL prompt rendered this way is not its template's
            logging.getLogger(__name__).warning(
                "tokenizer at %s has no chat template (tokenizer_config.json, chat_template.jinja or "
                "chat_template.json): prompts use the Qwen2.5-VL layout (system turn, images first); copy the "
                "model's template files next to the tokenizer for any other model", self.path)
        vocab = self._tok.get_vocab()
        missing = [t for t in (IMAGE_PAD, VISION_START, VISION_END, IM_START, IM_END) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer at {self.path} lacks {missing}: not a Qwen2-VL/Qwen2.5-VL tokenizer")
        self.vocab_size = len(self._tok)
        # Instruct models end their turn with <|im_end|>; the base tokenizer's eos is <|endoftext|>.
        self.eos_id = vocab[IM_END]
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else vocab.get(ENDOFTEXT,
                                                                                                 self.eos_id)
        self.image_token_id, self.vision_start_id, self.vision_end_id = vocab[IMAGE_PAD], vocab[VISION_START], \
            vocab[VISION_END]
        self.stop_ids = sorted({self.eos_id, vocab.get(ENDOFTEXT, self.eos_id)})
        opener = f"{IM_START}assistant\n"
        # what the template writes after the assistant opener: "<think>\n" for thinking checkpoints, else ""
        self.response_prefix = self.chat_prompt("", 0).rpartition(opener)[2]
        # texts that encode to a special id; escaped when they appear inside data (prompts.escape_special_tokens)
        self.special_texts = sorted(set(self._tok.get_added_vocab()) | set(self._tok.all_special_tokens))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, question: str, num_images: int) -> str:
        if not getattr(self._tok, "chat_template", None):
            return qwen_chat_prompt(question, num_images)
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": papo_user_text(question)}]
        return self._tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    def response_text(self, ids: Sequence[int]) -> str:
        """A response as the reward reads it: the template's think opener (if any), then the decoded tokens."""
        return self.response_prefix + self.decode(ids)


def processor_chat_template(path: Path) -> Optional[str]:
    """The chat template a processor keeps in its own ``chat_template.json`` (a download may hold the template only
    there, not in tokenizer_config.json / chat_template.jinja, which the tokenizer reads itself), or None."""
    import json

    f = path / "chat_template.json"
    return json.loads(f.read_text()).get("chat_template") if f.is_file() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_PAPO_CACHE", Path.home() / ".cache" / "megatron_papo"))


def build_tokenizer(cfg, corpus_texts: Optional[Iterable[str]] = None, cache_dir=None):
    """The tokenizer ``cfg`` (a ``TokenizerConfig``) names.

    sentencepiece with ``path`` null: train on ``corpus_texts`` (default: the synthetic tasks' texts) and cache the
    model under ``cache_dir`` keyed by a hash of corpus and settings, so later calls load the same file.
    """
    kind, path = cfg.type, cfg.path
    if kind == "huggingface":
        if not path:
            raise ValueError("data.tokenizer.path: required for type huggingface (a directory with the "
                             "Qwen2.5-VL tokenizer files)")
        return HFTokenizer(path)
    if kind != "sentencepiece":
        raise ValueError(f"data.tokenizer.type: unknown {kind!r}; use sentencepiece or huggingface")
    if path:
        if not Path(path).is_file():
            raise ValueError(f"data.tokenizer.path: sentencepiece model {path} does not exist; set it to null to "
                             f"train the demo tokenizer")
        return SentencePieceTokenizer(path)
    if corpus_texts is None:
        from megatron_papo.data.synthetic import synthetic_corpus

        corpus_texts = synthetic_corpus()
    texts = list(corpus_texts)
    vocab_size = int(getattr(cfg, "vocab_size", 512))
    digest = hashlib.sha256("\x00".join([_SPM_RECIPE, str(vocab_size), *texts]).encode()).hexdigest()[:16]
    model_file = Path(cache_dir or default_cache_dir()) / f"spm-{digest}.model"
    if not model_file.is_file():
        SentencePieceTokenizer.train(texts, model_file, vocab_size)
    return SentencePieceTokenizer(model_file)
