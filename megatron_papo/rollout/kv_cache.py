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
        self.prefix_padded = True  # whether any prompt has left padding (False: no prefix mask needed)
        self.row_counts: list[int] = []  # active rows per prompt, rows stay prompt-major
        self.row_steps = None  # [b] response index of each row's new key (None: all at sequence_len_offset)
        self.own_width = 0  # own positions a per-row step reads (the largest row step + 1, or the whole T)

    @property
    def shares_prefix(self) -> bool:
        return self.prefix is not None

    def share_prefix(self, prompt_len: int, n, keep: torch.Tensor, max_new: int, zeros: bool = False) -> None:
        """After the prefill: keep each prompt's cache once ([P, ng, L, hn]) and make room for n rows each
        (``n`` an int, or a list of rows per prompt); ``zeros``: the rows' cache starts zeroed (needed when
        rows at different steps read masked positions: an uninitialised NaN times a zero weight is NaN)."""
        dev = next(iter(self.key_value_memory_dict.values()))[0].device if self.key_value_memory_dict else None
        self.prefix, self.prefix_len, self.prefix_keep = {}, prompt_len, keep.to(dev) if dev else keep
        self.prefix_padded = bool((~keep).any())  # once per call, not per layer and step
        num_p = keep.shape[0]
        self.row_counts = [n] * num_p if isinstance(n, int) else [int(c) for c in n]
        for layer, (k, v) in list(self.key_value_memory_dict.items()):  # [L + T, P, ng, hn]
            self.prefix[layer] = tuple(t[:prompt_len].permute(1, 2, 0, 3).contiguous() for t in (k, v))
            shape = (sum(self.row_counts), k.shape[2], max_new, k.shape[3])
            new = k.new_zeros if zeros else k.new_empty
            self.key_value_memory_dict[layer] = (new(shape), new(shape))  # [N, ng, T, hn]

    def extend(self, other: "SharedPrefixContext") -> None:
        """Append ``other``'s prompts and rows (prefilled later, same prompt length and T) after this context's:
        the waiting prompts that continuous batching admits join the running batch."""
        self.prefix_keep = torch.cat([self.prefix_keep, other.prefix_keep])
        self.prefix_padded = self.prefix_padded or other.prefix_padded
        self.row_counts = self.row_counts + other.row_counts
        for layer in list(self.key_value_memory_dict):
            self.prefix[layer] = tuple(torch.cat(p) for p in zip(self.prefix[layer], other.prefix[layer]))
            own = zip(self.key_value_memory_dict[layer], other.key_value_memory_dict[layer])
            self.key_value_memory_dict[layer] = tuple(torch.cat(o) for o in own)

    def keep_rows(self, keep: torch.Tensor, row_prompt: torch.Tensor | None = None) -> None:
        """Drop finished rows: new row r = old row keep[r] (keep ascending, so rows stay prompt-major); prompts
        left without rows drop their prefix. ``row_prompt`` is accepted for callers of the old signature and
        ignored: the rows' prompts follow from ``row_counts``."""
        counts = torch.tensor(self.row_counts)
        local = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [b] prompt of each row
        new_counts = torch.bincount(local[keep.cpu()], minlength=len(counts))
        live = (new_counts > 0).nonzero().squeeze(-1)
        self.row_counts = new_counts[live].tolist()
        if len(live) < len(counts):
            self.prefix_keep = self.prefix_keep[live.to(self.prefix_keep.device)]
            for layer, pair in self.prefix.items():
                self.prefix[layer] = tuple(p.index_select(0, live.to(p.device)) for p in pair)
        for layer, (k, v) in self.key_value_memory_dict.items():
            idx = keep.to(k.device)
            self.key_value_memory_dict[layer] = (k.index_select(0, idx), v.index_select(0, idx))

    def set_row_steps(self, steps: torch.Tensor | None, width: int = 0) -> None:
        """Rows at different response steps (``steps`` [b] int64 on the cache's device, None: all at the same
        one): the next decode step writes row i's key at response index steps[i] and its attention reads the
        first ``width`` own positions, masked per row to steps[i] + 1."""
        self.row_steps, self.own_width = steps, width
        self._row_index = None if steps is None else torch.arange(len(steps), device=steps.device)

    def decode_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> SharedPrefixKV:
        """Store the new tokens' rotated keys / values ([sq, b, ng, hn]: sq = 1 per decode step, the whole
        response when scoring) and return the layer's whole cache."""
        k, v = self.key_value_memory_dict[layer]  # [N, ng, T, hn]
        pk, pv = self.prefix[layer]
        if self.row_steps is not None:  # one new key per row, each at its own response index
            b, w = key.shape[1], self.own_width
            k[self._row_index, :, self.row_steps] = key[0]  # [b, ng, hn]
            v[self._row_index, :, self.row_steps] = value[0]
            return SharedPrefixKV(pk, pv, self.prefix_keep, self.row_counts, k[:b, :, :w], v[:b, :, :w],
                                  self.prefix_padded, own_len=self.row_steps + 1)
        t, sq = self.sequence_len_offset - self.prefix_len, key.shape[0]  # first new token's response index
        k[:, :, t:t + sq] = key.permute(1, 2, 0, 3)
        v[:, :, t:t + sq] = value.permute(1, 2, 0, 3)
        return SharedPrefixKV(pk, pv, self.prefix_keep, self.row_counts, k[:, :, :t + sq], v[:, :, :t + sq],
                              self.prefix_padded)
