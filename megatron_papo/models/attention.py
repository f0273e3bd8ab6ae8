"""Kept for compatibility (scripts written before the family folders): the attention modules now live in
``models.common.attention``."""

from megatron_papo.models.common.attention import (RopeCachingSelfAttention, SDPAttention,  # noqa: F401
                                                   SharedPrefixKV, softmax_part)
