"""Attention modules of the local spec: SDPA core attention and a self-attention that caches rotated keys.

``SDPAttention``: core attention on ``torch.nn.functional.scaled_dot_product_attention``, a drop-in for
megatron's ``DotProductAttention`` (same constructor and forward), chosen through the layer spec. It needs no
CUDA buffers and handles megatron's cases: no mask, a boolean mask (True = masked out, as megatron uses
it), causal attention with fewer queries than keys (KV-cache decoding, bottom-right aligned), and packed sequences
(megatron's ``PackedSeqParams``: causal within each sequence, one SDPA call per sequence). Grouped-query
attention runs on the grouped K/V directly (``enable_gqa``), without repeating them per query head.

``RopeCachingSelfAttention``: megatron's ``SelfAttention`` whose static KV cache can hold keys with RoPE already
applied. megatron-core 0.16.1's static-batching path (``Attention._adjust_key_value_for_inference``) stores
un-rotated keys and returns ``k_pos_emb[:sequence_end]``, so every decode step re-computes cos/sin of the
rotary table and re-rotates ALL cached keys, in every layer: O(cached length) work per token. When the
inference context opts in (``keys_hold_rope = True``, see ``megatron_papo.rollout``), this module rotates only
the new keys before storing them, and the model is given the position ids of the new tokens only (the rotary
table then covers just them). A context that also ``shares_prefix`` (``megatron_papo.rollout.kv_cache``) keeps
each prompt's keys once for its n samples and hands ``SDPAttention`` a ``SharedPrefixKV`` at decode. Without
the opt-in (training, other callers) it is megatron's module unchanged.

Legend: sq/sk query/key length, b batch, np heads on this rank, ng query groups on this rank, hn head dim;
shared-prompt attention: P prompts, L prompt length, t own (response) keys of a row, rep = np/ng, w a row's
queries per group (rep x sq), B the batch of one attention part, s its keys.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
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
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias; use an explicit mask")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if isinstance(key, SharedPrefixKV):
            return self._shared_prefix_decode(query, key)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        keep = None  # [b|1, 1|np, sq, sk] True = attend
        if attention_mask is not None:
            keep = ~attention_mask
        if mask_type == AttnMaskType.causal and (keep is not None or sq != sk):
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            keep = causal if keep is None else keep & causal
        is_causal = mask_type == AttnMaskType.causal and keep is None
        p = self.dropout_p if self.training else 0.0
        rep = self.num_heads // self.num_groups
        if sq == 1 and rep > 1 and not is_causal and (keep is None or keep.dim() < 3 or keep.shape[-3] == 1):
            # one query per row (KV-cache decoding): a group's query heads become that group's queries, so
            # K/V are read once per group, not once per head; the mask [b|1, 1, 1, sk] broadcasts unchanged
            q = q.reshape(b, self.num_groups, rep, self.head_dim)  # [b, ng, rep, hn]
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=p, is_causal=is_causal, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # [b, np, sq, hn] (or [b, ng, rep, hn] = the same memory)
        out = out.reshape(b, self.num_heads, sq, self.head_dim)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)  # [sq, b, np*hn]

    def _packed(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """Packed sequences (megatron's ``thd`` layout: query [t, np, hn], key/value [t, ng, hn], the batch axis
        squeezed out): causal attention within each sequence of ``cu_seqlens_q`` [k + 1], never across, i.e.
        the block-diagonal causal mask, computed one sequence at a time (work of sum s_i^2, not t^2): [t, np*hn]."""
        if self.attn_mask_type != AttnMaskType.causal:
            raise ValueError("SDPAttention: packed sequences are for causal (language model) attention")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        p = self.dropout_p if self.training else 0.0
        outs = []
        with tensor_parallel.get_cuda_rng_tracker().fork():
            for start, end in zip(bounds[:-1], bounds[1:]):
                q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))  # [1, n, s_i, hn]
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale,
                                                   enable_gqa=q.shape[1] != k.shape[1])  # [1, np, s_i, hn]
                outs.append(o[0].transpose(0, 1).reshape(end - start, self.num_heads * self.head_dim))
        return torch.cat(outs)

    def _shared_prefix_decode(self, query: torch.Tensor, kv: "SharedPrefixKV") -> torch.Tensor:
        """sq queries per row against its prompt's shared keys and its own keys: [sq, b, np*hn].

        sq = 1 when decoding; sq = the whole response when scoring (``megatron_papo.training.scoring``): query j
        is the row's own position t - sq + j and sees its own keys up to there (causal, bottom-right aligned),
        and the whole prompt. Each part's softmax comes with its log-sum-exp, and the two are merged exactly:
        softmax over both = lerp(prefix out, own out, sigmoid(lse_own - lse_prefix)). Decoding with ``joint_key``
        (one row per prompt, both parts in one buffer) reads them in one call instead: no split, no merge.
        """
        sq, b, ng, hn = query.shape[0], query.shape[1], self.num_groups, self.head_dim
        rep = self.num_heads // ng
        # a group's query heads and the row's sq positions together form that group's queries
        q = query.reshape(sq, b, ng, rep, hn).permute(1, 2, 0, 3, 4).reshape(b, ng, sq * rep, hn)
        if kv.joint_key is not None and sq == 1:  # one row per prompt: prompt and own keys in one call
            out = softmax_part(q, kv.joint_key, kv.joint_value, self.softmax_scale, _joint_bias(kv, q.dtype))[0]
        else:
            o_own, lse_own = self._own_part(q, kv, sq)  # [b, ng, sq*rep, hn], [b, ng, sq*rep]
            o_pre, lse_pre = self._prefix_part(q, kv, self.softmax_scale)
            out = torch.lerp(o_pre, o_own, torch.sigmoid(lse_own - lse_pre)[..., None])  # [b, ng, sq*rep, hn]
        out = out.reshape(b, ng, sq, rep, hn).permute(2, 0, 1, 3, 4)  # [sq, b, ng, rep, hn]
        return out.reshape(sq, b, self.num_heads * hn)

    def _own_part(self, q: torch.Tensor, kv: "SharedPrefixKV", sq: int):
        """The rows' own (response) keys: softmax output [b, ng, sq*rep, hn] and log-sum-exp [b, ng, sq*rep].

        Decoding (sq = 1) sees every own key, or with ``own_len`` (rows at different steps) row i its first
        own_len[i]; scoring masks the keys after each query (causal, bottom-right aligned). A mask here is
        additive ([b|1, 1, sq*rep, t] float, -inf = not a key); every query must keep at least one key (its own
        position always is one)."""
        bias = None
        if sq > 1:
            t, rep = kv.own_key.shape[2], q.shape[2] // sq
            causal = torch.ones(sq, t, dtype=torch.bool, device=q.device).tril(diagonal=t - sq)  # [sq, t]
            causal = causal.repeat_interleave(rep, dim=0)  # [sq*rep, t], query-major like q
            bias = torch.zeros(causal.shape, dtype=q.dtype, device=q.device).masked_fill_(~causal, float("-inf"))
        elif kv.own_len is not None:  # rows at different response steps: row i has own_len[i] keys so far
            late = torch.arange(kv.own_key.shape[2], device=q.device) >= kv.own_len[:, None, None, None]
            bias = torch.zeros(late.shape, dtype=q.dtype, device=q.device).masked_fill_(late, float("-inf"))
        return softmax_part(q, kv.own_key, kv.own_value, self.softmax_scale, bias)  # bias [b|1, 1, w|1, t]

    @staticmethod
    def _prefix_part(q: torch.Tensor, kv: "SharedPrefixKV", scale: float):
        """Each prompt's keys read once for all its rows: softmax output [b, ng, w, hn] and log-sum-exp
        [b, ng, w] (w = a row's queries per group: rep heads x its positions).

        One batched call per run of consecutive prompts with equal rows each (all prompts before any row
        finished); prompts whose rows all finished are skipped. Slices, never copies, of the prompt cache.
        """
        b, ng, w, hn = q.shape
        bias = None  # [P, 1, 1, L] float, -inf on the left padding of shorter prompts
        if kv.prefix_padded:
            bias = torch.zeros(kv.prefix_keep.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill_(~kv.prefix_keep, float("-inf"))[:, None, None, :]
        outs, lses, row, p0 = [], [], 0, 0
        for c, run in itertools.groupby(kv.row_counts):
            num_p = len(list(run))
            prompts, p0 = slice(p0, p0 + num_p), p0 + num_p
            if c == 0:
                continue
            qp = q[row:row + c * num_p]
            row += c * num_p
            if c > 1:  # a prompt's rows side by side: [p, ng, c*w, hn]
                qp = qp.reshape(num_p, c, ng, w, hn).transpose(1, 2).reshape(num_p, ng, c * w, hn)
            o, lse = softmax_part(qp, kv.prefix_key[prompts], kv.prefix_value[prompts], scale,
                                  None if bias is None else bias[prompts])
            outs.append(_rows_first(o, c)), lses.append(_rows_first(lse[..., None], c)[..., 0])
        return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def softmax_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 bias: Optional[torch.Tensor] = None):
    """Attention of q [B, ng, w, hn] on one part of the keys, k / v [B, ng, s, hn], bias additive
    [B|1, 1, w|1, s] (-inf = masked): (output [B, ng, w, hn], log-sum-exp [B, ng, w] of the scaled scores).

    On CPU one fused kernel (PyTorch's flash attention for CPU, which returns the log-sum-exp) reads each key
    block once, with no score tensor in memory and no separate max / exp / sum passes; elsewhere, and with
    autograd on (that kernel's log-sum-exp carries no gradient), the same formula in plain ops. Every query must
    have at least one unmasked key.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and not torch.is_grad_enabled():
        return _CPU_FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    s = (q * scale) @ k.transpose(-1, -2)  # [B, ng, w, s]
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _joint_bias(kv: "SharedPrefixKV", dtype) -> Optional[torch.Tensor]:
    """Additive mask [b, 1, 1, L + t] of a joint read (-inf on prompt padding and on own keys past ``own_len``),
    None when nothing is masked."""
    if not kv.prefix_padded and kv.own_len is None:
        return None
    keep = kv.prefix_keep  # [b, L] (one row per prompt)
    L, t = keep.shape[1], kv.joint_key.shape[2] - keep.shape[1]
    own = torch.arange(t, device=keep.device)[None, :]  # [1, t]
    own = own < kv.own_len[:, None] if kv.own_len is not None else (own >= 0).expand(keep.shape[0], t)
    keep = torch.cat([keep if kv.prefix_padded else torch.ones_like(keep), own], 1)  # [b, L + t]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[:, None, None]


def _rows_first(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``[p, ng, rows*w, x]`` -> ``[p*rows, ng, w, x]``: back to one entry per row, prompt-major."""
    if rows == 1:
        return t
    num_p, ng, width, x = t.shape
    return t.reshape(num_p, ng, rows, width // rows, x).transpose(1, 2).reshape(num_p * rows, ng, -1, x)


@dataclass
class SharedPrefixKV:
    """A decode (or scoring) step's KV cache with each prompt's keys stored once for all its sample rows.

    prefix_key / prefix_value ``[P, ng, L, hn]`` (keys rotated), prefix_keep ``[P, L]`` bool (False on left
    padding), row_counts: rows per prompt (rows are prompt-major), own_key / own_value ``[b, ng, t, hn]``: each
    row's response so far, the current token(s) included; with ``own_len`` (rows at different steps: continuous
    batching, fixed-shape decode) row i's first own_len[i] keys only, the rest masked. With ``joint_key`` /
    ``joint_value`` (one row per prompt, ``RunningContext`` at n = 1) a decode step reads both parts in one call.
    Built by ``megatron_papo.rollout.kv_cache``.
    """

    prefix_key: torch.Tensor
    prefix_value: torch.Tensor
    prefix_keep: torch.Tensor
    row_counts: list
    own_key: torch.Tensor
    own_value: torch.Tensor
    prefix_padded: bool = True  # False: every prompt position is a real token (no mask to apply)
    own_len: Optional[torch.Tensor] = None  # [b] int64 own keys of each row (None: all t; decoding only)
    # one row per prompt (n = 1), row i's prompt keys followed by its own keys in one buffer: [b, ng, L + t, hn]
    # views that a decode step reads in one call (no prompt / own split, no merge); None: the split read
    joint_key: Optional[torch.Tensor] = None
    joint_value: Optional[torch.Tensor] = None


class RopeCachingSelfAttention(SelfAttention):
    """``SelfAttention`` that, for an opted-in static inference context, caches keys with RoPE applied.

    Contract with the caller when ``inference_context.keys_hold_rope`` is True: the rotary embedding passed in
    covers the new positions only (``[sq, b, 1, dim]``, from position ids ``[3, b, sq]``), so the query is
    rotated by megatron's forward as usual and the key is rotated here, once, before it enters the cache.
    """

    def cache_key_value(self, hidden_states: torch.Tensor, inference_context, rotary_pos_emb: torch.Tensor):
        """Write the keys (rotated) and values of ``hidden_states`` [sq, b, h] (already normed) into the static
        cache at the context's offsets, and nothing else: positions whose attention output nobody reads (the
        prefill's last layer before each prompt's last position, ``megatron_papo.rollout.prefill``).
        ``rotary_pos_emb`` [sq, b, 1, dim] covers these positions (``keys_hold_rope`` contract)."""
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        self._adjust_key_value_for_inference(inference_context, query, key, value, (rotary_pos_emb,) * 2)

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        ctx = inference_context if inference_context is not None else inference_params
        if (ctx is None or not getattr(ctx, "keys_hold_rope", False) or not ctx.is_static_batching()
                or self.config.flash_decode or self.training):
            return super()._adjust_key_value_for_inference(
                ctx, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                sequence_len_offset)
        if rotary_pos_emb is not None:
            q_pos_emb, k_pos_emb = rotary_pos_emb  # [sq, b, 1, dim]: the new positions only
            if k_pos_emb.shape[0] != key.shape[0]:
                raise ValueError(f"keys_hold_rope: the rotary embedding must cover the {key.shape[0]} new "
                                 f"positions only, got {k_pos_emb.shape[0]}; pass the new tokens' position ids")
            key = apply_rotary_pos_emb(key, k_pos_emb, config=self.config, cp_group=self.pg_collection.cp,
                                       mscale=_yarn_get_concentration_factor_from_config(self.config))
            rotary_pos_emb = (q_pos_emb, None)  # the query is rotated by the caller, the key is done
        if getattr(ctx, "shares_prefix", False):  # decoding on shared prompt keys (core attention: SDPAttention)
            kv = ctx.decode_kv(self.layer_number, key, value)
            return query, kv, kv, rotary_pos_emb, AttnMaskType.no_mask, None
        memory = ctx.key_value_memory_dict.get(self.layer_number)
        if memory is None:  # [max S, max b, ng, hn] each
            memory = tuple(self._allocate_memory(ctx.max_sequence_length, ctx.max_batch_size, dim, t.dtype)
                           for dim, t in ((self.key_hidden_size, key), (self.val_hidden_size, value)))
            ctx.key_value_memory_dict[self.layer_number] = memory
        s0, b0 = ctx.sequence_len_offset, ctx.batch_size_offset
        s1, b1 = s0 + key.shape[0], b0 + key.shape[1]
        if s1 > memory[0].shape[0] or b1 > memory[0].shape[1]:
            raise ValueError(f"KV cache overflow: rows {b0}:{b1}, positions {s0}:{s1} exceed the context's "
                             f"{tuple(memory[0].shape[:2])}; raise max_sequence_length / max_batch_size")
        memory[0][s0:s1, b0:b1] = key
        memory[1][s0:s1, b0:b1] = value
        # past the prompt the single query attends to every cached key (megatron drops the causal mask too)
        mask_type = AttnMaskType.no_mask if s0 > 0 else self.attn_mask_type
        return query, memory[0][:s1, b0:b1], memory[1][:s1, b0:b1], rotary_pos_emb, mask_type, None
