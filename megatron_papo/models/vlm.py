"""Kept for compatibility (scripts written before the family folders): the names now live in
``models.common.vlm``, ``models.qwen2_5_vl.model`` and ``models.registry``."""

from megatron_papo.models.common.vlm import VOCAB_PAD_MULTIPLE, VLMBase, padded_vocab_size  # noqa: F401
from megatron_papo.models.qwen2_5_vl.model import Qwen25VLModel  # noqa: F401
from megatron_papo.models.registry import build_vlm  # noqa: F401
