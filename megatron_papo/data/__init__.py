"""Data: webdataset shards -> samples -> encoded prompts; image processor, tokenizers, synthetic tasks."""

from megatron_papo.data.image_processor import Qwen2VLImageProcessor, smart_resize
from megatron_papo.data.prompts import PromptEncoder, PromptInputs, encode_prompt
from megatron_papo.data.reader import ShardReader, resolve_shards
from megatron_papo.data.shards import BadSample, ShardWriter, SkipSample, write_shards
from megatron_papo.data.synthetic import ensure_synthetic_shards, make_synthetic_samples, synthetic_corpus
from megatron_papo.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer

__all__ = ["Qwen2VLImageProcessor", "smart_resize", "PromptEncoder", "PromptInputs", "encode_prompt", "ShardReader",
           "resolve_shards", "BadSample", "ShardWriter", "SkipSample", "write_shards", "ensure_synthetic_shards",
           "make_synthetic_samples", "synthetic_corpus", "HFTokenizer", "SentencePieceTokenizer", "build_tokenizer"]
