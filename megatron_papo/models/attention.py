"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``: the CPU/local spec's attention.

Drop-in for megatron's ``DotProductAttention`` (same constructor and forward), chosen through the layer spec.
It needs no CUDA buffers and handles megatron's three cases: no mask, a boolean mask (True = masked out, as
megatron uses it), and causal attention with fewer queries than keys (KV-cache decoding, bottom-right aligned).

Legend: sq/sk query/key length, b batch, np heads on this rank, ng query groups on this rank, hn head dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the transformer_engine spec")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes no packed sequences or attention bias; use an explicit mask")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        if self.num_heads != self.num_groups:
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        keep = None  # [b|1, 1|np, sq, sk] True = attend
        if attention_mask is not None:
            keep = ~attention_mask
        if mask_type == AttnMaskType.causal and (keep is not None or sq != sk):
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            keep = causal if keep is None else keep & causal
        is_causal = mask_type == AttnMaskType.causal and keep is None
        p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=p, is_causal=is_causal, scale=self.softmax_scale
            )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)  # [sq, b, np*hn]
