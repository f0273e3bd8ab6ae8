"""Data: webdataset shards -> samples -> encoded prompts; image processor, tokenizers, synthetic tasks."""

from megatron_papo.data.image_processor import Qwen2VLImageProcessor, smart_resize
from megatron_papo.data.prompts import PromptInputs, encode_prompt
from megatron_papo.data.synthetic import make_synthetic_samples, synthetic_corpus
from megatron_papo.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer

__all__ = ["Qwen2VLImageProcessor", "smart_resize", "PromptInputs", "encode_prompt", "make_synthetic_samples",
           "synthetic_corpus", "HFTokenizer", "SentencePieceTokenizer", "build_tokenizer"]
