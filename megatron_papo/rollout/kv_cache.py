"""The engine's KV cache: rotated keys, and one copy of each prompt's keys shared by its n samples.

megatron-core's static cache (``StaticInferenceContext``) keeps one ``[S, b, ng, hn]`` buffer per layer and,
in 0.16.1, re-rotates every cached key at every decode step. ``SharedPrefixContext`` is that context with two
changes, both used through ``megatron_papo.models.common.attention.RopeCachingSelfAttention``:

- keys are stored with RoPE applied (``keys_hold_rope``), so a step rotates its new key only;
- after the prefill, each prompt's keys/values stay ONE copy ``[P, ng, L, hn]`` instead of being copied to its
  n sample rows; the rows' own (response) keys go to ``[N, ng, T, hn]``. A decode step's attention reads the
  prompt part once per prompt for all its rows (``SharedPrefixKV``): decoding is memory-bound on CPU, and the
  prompt's keys were n times the traffic (and memory) they need to be.

The trainer's scoring pass (``megatron_papo.training.scoring``) uses the same context: one prefill of each
distinct prompt, then all response tokens of all rows in one forward (``decode_kv`` with sq = T).

Rows at different steps (continuous batching, ``rollout.scheduler``; fixed-shape decode): ``set_row_steps``
makes a step write each row's key at its own response index and mask the row's own keys past it.
``RunningContext`` is the generation cache for that: room for a row cap allocated once, prompts admitted into
it and finished rows compacted in place. With one row per prompt (n = 1, ``joint=True``) a layer's prompt and own
parts are two views of ONE ``[rows, ng, L + T, hn]`` buffer per K / V, so a decode step reads a row's keys in one
attention call (``SharedPrefixKV.joint_key``) instead of two calls and a log-sum-exp merge.

Legend: P prompts, N sample rows (b active), L padded prompt length, T most new tokens, ng query groups on this
rank, hn head dim.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_papo.models.common.attention import SharedPrefixKV


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

    def share_prefix(self, prompt_len: int, n, keep: torch.Tensor, max_new: int) -> None:
        """After the prefill: keep each prompt's cache once ([P, ng, L, hn]) and make room for n rows each
        (``n`` an int, or a list of rows per prompt)."""
        dev = next(iter(self.key_value_memory_dict.values()))[0].device if self.key_value_memory_dict else None
        self.prefix, self.prefix_len, self.prefix_keep = {}, prompt_len, keep.to(dev) if dev else keep
        self.prefix_padded = bool((~keep).any())  # once per call, not per layer and step
        num_p = keep.shape[0]
        self.row_counts = [n] * num_p if isinstance(n, int) else [int(c) for c in n]
        for layer, (k, v) in list(self.key_value_memory_dict.items()):  # [L + T, P, ng, hn]
            self.prefix[layer] = tuple(t[:prompt_len].permute(1, 2, 0, 3).contiguous() for t in (k, v))
            shape = (sum(self.row_counts), k.shape[2], max_new, k.shape[3])
            self.key_value_memory_dict[layer] = (k.new_empty(shape), v.new_empty(shape))  # [N, ng, T, hn]

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
                                  self.prefix_padded, self.row_steps + 1, *self._joint_views(layer, b, w))
        t, sq = self.sequence_len_offset - self.prefix_len, key.shape[0]  # first new token's response index
        k[:, :, t:t + sq] = key.permute(1, 2, 0, 3)
        v[:, :, t:t + sq] = value.permute(1, 2, 0, 3)
        joint = self._joint_views(layer, k.shape[0], t + sq) if sq == 1 else (None, None)
        return SharedPrefixKV(pk, pv, self.prefix_keep, self.row_counts, k[:, :, :t + sq], v[:, :, :t + sq],
                              self.prefix_padded, None, *joint)

    def _joint_views(self, layer: int, rows: int, width: int) -> tuple:
        """(K, V) ``[rows, ng, L + width, hn]``: prompt and own keys of each row in one buffer, or (None, None)
        where they are apart (this context: the prompt's keys are shared by its rows)."""
        return None, None


class RunningContext(SharedPrefixContext):
    """The continuous-batching cache (``rollout.scheduler``): room for ``rows`` rows and ``prompts`` prompts,
    allocated once (zeros, so masked reads stay finite) on the first admission; the running rows and their prompts
    sit at the front, prompt-major. Admitting copies a prefill in behind them; compaction moves the kept rows
    forward in place (only the ``width`` response positions written so far), so neither re-allocates the cache.
    ``prefix`` / ``key_value_memory_dict`` / ``prefix_keep`` are views of the occupied part."""

    def __init__(self, rows: int, prompts: int, prompt_len: int, max_new: int, joint: bool = False):
        super().__init__(max_batch_size=prompts, max_sequence_length=prompt_len + max_new)
        if joint and rows != prompts:
            raise ValueError(f"RunningContext: joint=True needs one row per prompt, got room for {rows} rows and "
                             f"{prompts} prompts; use joint=False")
        self.cap_rows, self.cap_prompts, self.prefix_len, self.max_new = rows, prompts, prompt_len, max_new
        self.prefix, self.prefix_padded, self.rows = {}, False, 0
        self._store: dict = {}  # layer -> (prefix K, prefix V [prompts, ng, L, hn], own K, own V [rows, ng, T, hn])
        # n = 1: each layer's prompt and own parts are views of one [rows, ng, L + T, hn] buffer per K / V, so a
        # decode step reads a row's keys in one attention call (measured faster than two calls and a merge)
        self.joint, self._joint = joint, {}
        self._keep = None  # [prompts, L] bool

    def admit(self, pre: StaticInferenceContext, keep: torch.Tensor, n: int) -> None:
        """Append the k prompts prefilled in ``pre`` (cache ``[L, k, ng, hn]`` per layer; ``keep`` [k, L]) with n
        rows each (their response positions are written by their own steps before they are read)."""
        k, p0, L = keep.shape[0], len(self.row_counts), self.prefix_len
        if p0 + k > self.cap_prompts or self.rows + k * n > self.cap_rows:
            raise ValueError(f"RunningContext overflow: {p0 + k} prompts / {self.rows + k * n} rows exceed the "
                             f"room for {self.cap_prompts} / {self.cap_rows}")
        for layer, (key, value) in pre.key_value_memory_dict.items():
            if layer not in self._store:
                self._allocate(layer, key, value)
            pk, pv = self._store[layer][:2]
            pk[p0:p0 + k], pv[p0:p0 + k] = key[:L].permute(1, 2, 0, 3), value[:L].permute(1, 2, 0, 3)
        if self._keep is None:
            self._keep = torch.ones(self.cap_prompts, L, dtype=torch.bool, device=keep.device)
        self._keep[p0:p0 + k] = keep
        self.prefix_padded = self.prefix_padded or bool((~keep).any())
        self.row_counts, self.rows = self.row_counts + [n] * k, self.rows + k * n
        self._views()

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        ng, hn, L, T = key.shape[2], key.shape[3], self.prefix_len, self.max_new
        if self.joint:  # [rows, ng, L + T, hn]: the prompt part, then the own part
            ks, vs = key.new_zeros(self.cap_rows, ng, L + T, hn), value.new_zeros(self.cap_rows, ng, L + T, hn)
            self._joint[layer] = (ks, vs)
            self._store[layer] = (ks[:, :, :L], vs[:, :, :L], ks[:, :, L:], vs[:, :, L:])
            return
        pre_shape, own_shape = (self.cap_prompts, ng, L, hn), (self.cap_rows, ng, T, hn)
        self._store[layer] = (key.new_zeros(pre_shape), value.new_zeros(pre_shape),
                              key.new_zeros(own_shape), value.new_zeros(own_shape))

    def _joint_views(self, layer: int, rows: int, width: int) -> tuple:
        if not self.joint:
            return None, None
        ks, vs = self._joint[layer]
        return ks[:rows, :, :self.prefix_len + width], vs[:rows, :, :self.prefix_len + width]

    def keep_rows(self, keep: torch.Tensor, width: int | None = None) -> None:
        """Drop finished rows: new row r = old row keep[r] (ascending); prompts left without rows drop their
        keys; ``width``: response positions written so far (default all)."""
        counts = torch.tensor(self.row_counts)
        local = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [b] prompt of each row
        new_counts = torch.bincount(local[keep.cpu()], minlength=len(counts))
        live = (new_counts > 0).nonzero().squeeze(-1)
        w, m, q = width or self.max_new, len(keep), len(live)
        for pk, pv, k, v in self._store.values():
            idx = keep.to(k.device)
            k[:m, :, :w], v[:m, :, :w] = k[idx, :, :w], v[idx, :, :w]  # gathered first, then written
            if q < len(counts):
                pk[:q], pv[:q] = pk[live.to(pk.device)], pv[live.to(pv.device)]
        if q < len(counts):
            self._keep[:q] = self._keep[live.to(self._keep.device)]
        self.row_counts, self.rows = new_counts[live].tolist(), m
        self._views()

    def _views(self) -> None:
        p, b = len(self.row_counts), self.rows
        for layer, (pk, pv, k, v) in self._store.items():
            self.prefix[layer], self.key_value_memory_dict[layer] = (pk[:p], pv[:p]), (k[:b], v[:b])
        self.prefix_keep = self._keep[:p]
