"""The engine's KV cache: rotated keys, and one copy of each prompt's keys shared by its n samples.

megatron-core's static cache (``StaticInferenceContext``) keeps one ``[S, b, ng, hn]`` buffer per layer and,
in 0.16.1, re-rotates every cached key at every decode step. ``SharedPrefixContext`` is that context with two
changes, both used through ``megatron_papo.models.attention.RopeCachingSelfAttention``:

- keys are stored with RoPE applied (``keys_hold_rope``), so a step rotates its new key only;
- after the prefill, each prompt's keys/values stay ONE copy ``[P, ng, L, hn]`` instead of being copied to its
  n sample rows; the rows' own (response) keys go to ``[N, ng, T, hn]``. A decode step's attention reads the
  prompt part once per prompt for all its rows (``SharedPrefixKV``): decoding is memory-bound on CPU, and the
  prompt's keys were n times the traffic (and memory) they need to be.

The trainer's scoring pass (``megatron_papo.training.scoring``) uses the same context: one prefill of each
distinct prompt, then all response tokens of all rows in one forward (``decode_kv`` with sq = T).

Legend: P prompts, N sample rows (b active), L padded prompt length, T most new tokens, ng query groups on this
rank, hn head dim.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_papo.models.attention import SharedPrefixKV


class SharedPrefixContext(StaticInferenceContext):
    """Static inference context whose cache holds rotated keys and shares prompt keys across samples."""

    keys_hold_rope = True

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        super().__init__(max_batch_size=max_batch_size, max_sequence_length=max_sequence_length)
        self.prefix = None  # layer -> (K, V) [P, ng, L, hn] once shared
        self.prefix_len = 0
        self.prefix_keep = None  # [P, L] bool, True = a real prompt token (left padding is False)
        self.row_counts: list[int] = []  # active rows per prompt, rows stay prompt-major

    @property
    def shares_prefix(self) -> bool:
        return self.prefix is not None

    def share_prefix(self, prompt_len: int, n, keep: torch.Tensor, max_new: int) -> None:
        """After the prefill: keep each prompt's cache once ([P, ng, L, hn]) and make room for n rows each
        (``n`` an int, or a list of rows per prompt)."""
        dev = next(iter(self.key_value_memory_dict.values()))[0].device if self.key_value_memory_dict else None
        self.prefix, self.prefix_len, self.prefix_keep = {}, prompt_len, keep.to(dev) if dev else keep
        num_p = keep.shape[0]
        self.row_counts = [n] * num_p if isinstance(n, int) else [int(c) for c in n]
        for layer, (k, v) in list(self.key_value_memory_dict.items()):  # [L + T, P, ng, hn]
            self.prefix[layer] = tuple(t[:prompt_len].permute(1, 2, 0, 3).contiguous() for t in (k, v))
            shape = (sum(self.row_counts), k.shape[2], max_new, k.shape[3])
            self.key_value_memory_dict[layer] = (k.new_empty(shape), v.new_empty(shape))  # [N, ng, T, hn]

    def keep_rows(self, keep: torch.Tensor, row_prompt: torch.Tensor) -> None:
        """Drop finished rows: new row r = old row keep[r] (keep ascending, so rows stay prompt-major)."""
        self.row_counts = torch.bincount(row_prompt[keep], minlength=len(self.row_counts)).tolist()
        for layer, (k, v) in self.key_value_memory_dict.items():
            idx = keep.to(k.device)
            self.key_value_memory_dict[layer] = (k.index_select(0, idx), v.index_select(0, idx))

    def decode_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> SharedPrefixKV:
        """Store the new tokens' rotated keys / values ([sq, b, ng, hn]: sq = 1 per decode step, the whole
        response when scoring) and return the layer's whole cache."""
        t, sq = self.sequence_len_offset - self.prefix_len, key.shape[0]  # first new token's response index
        k, v = self.key_value_memory_dict[layer]  # [N, ng, T, hn]
        k[:, :, t:t + sq] = key.permute(1, 2, 0, 3)
        v[:, :, t:t + sq] = value.permute(1, 2, 0, 3)
        pk, pv = self.prefix[layer]
        return SharedPrefixKV(pk, pv, self.prefix_keep, self.row_counts, k[:, :, :t + sq], v[:, :, :t + sq])
