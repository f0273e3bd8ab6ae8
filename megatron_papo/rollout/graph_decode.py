"""Fixed-shape decode: every step on preallocated buffers of static shape, so it can be a CUDA graph.

The continuous-batching loop (``rollout.scheduler``) moves rows around: finished rows are compacted away, new
prompts are appended, the own-key slice grows with the longest row. A graph needs the opposite: the same tensors
at the same addresses every step. ``FixedShapeDecoder`` keeps the same schedule semantics on fixed buffers:

- slots: ``G = max_rows // n`` prompt groups of n rows each; a prompt occupies one group slot (rows
  ``g*n .. g*n+n-1``) from its prefill until all its rows are done, then the next waiting prompt takes the lowest
  free slot. Rows never move, finished rows keep computing (ignored) until their group is done;
- cache (``FixedSlotContext``): prompt keys ``[G, ng, L, hn]``, response keys ``[G*n, ng, T, hn]``; a step
  writes row i's key at its own step and reads all T positions, masked per row (``own_len``);
- inputs: token, position and step buffers ``[G*n]`` on the device, filled before each step;
- buckets: a step computes the first ``b`` rows, b = n x the smallest ``GraphBuckets`` size (in groups) holding
  the highest occupied slot, so shapes take a few values; on a CUDA device each bucket's step is captured once
  (``platform.decode_accel.capture``) and replayed, falling back to eager when capture is impossible (CPU, PP > 1,
  an operation a graph cannot hold).

Outputs equal the other paths' (same row ids, steps and draws). On CPU this path only costs more (it reads all T
response positions each step); it exists for graphs and is tested equal on CPU.

Legend: G group slots, n rows per group, R = G*n row slots, b rows a step computes, L padded prompt length,
T most new tokens, ng query groups on this rank, hn head dim, Vs vocabulary shard.
"""

from __future__ import annotations

import torch

from megatron_papo.models.common.attention import SharedPrefixKV
from megatron_papo.platform.decode_accel import GraphBuckets, capture, graph_pool
from megatron_papo.rollout.kv_cache import SharedPrefixContext
from megatron_papo.rollout.scheduler import Outputs, Slots


class FixedSlotContext(SharedPrefixContext):
    """The shared-prompt cache on fixed slots: prompt group g's keys at [g], its rows' at [g*n, (g+1)*n)."""

    def __init__(self, groups: int, n: int, prompt_len: int, max_new: int, device):
        super().__init__(max_batch_size=groups, max_sequence_length=prompt_len + max_new)
        self.groups, self.n, self.prefix_len, self.max_new, self.device = groups, n, prompt_len, max_new, device
        self.prefix, self.prefix_padded = {}, True  # always masked: a slot's prompt changes, the graph does not
        self.prefix_keep = torch.ones(groups, prompt_len, dtype=torch.bool, device=device)
        self.row_counts = [n] * groups
        self._all_rows = torch.arange(groups * n, device=device)

    def fill(self, slots: list[int], pre: SharedPrefixContext, keep: torch.Tensor) -> None:
        """Copy prefilled prompts (``pre``'s cache ``[L, k, ng, hn]`` per layer, ``keep`` [k, L]) into the
        group slots ``slots``."""
        idx = torch.tensor(slots, device=self.device)
        for layer, (k, v) in pre.key_value_memory_dict.items():
            if layer not in self.prefix:  # allocated on first use, zeros: masked reads of free slots stay finite
                shape = (self.groups, k.shape[2], self.prefix_len, k.shape[3])
                self.prefix[layer] = (k.new_zeros(shape), v.new_zeros(shape))
                own = (self.groups * self.n, k.shape[2], self.max_new, k.shape[3])
                self.key_value_memory_dict[layer] = (k.new_zeros(own), v.new_zeros(own))  # [R, ng, T, hn]
            for dst, src in zip(self.prefix[layer], (k, v)):
                dst.index_copy_(0, idx, src[:self.prefix_len].permute(1, 2, 0, 3))
        self.prefix_keep.index_copy_(0, idx, keep.to(self.device))

    def set_row_steps(self, steps: torch.Tensor | None, width: int = 0) -> None:
        self.row_steps, self.own_width = steps, self.max_new
        self._row_index = None if steps is None else self._all_rows[:len(steps)]

    def decode_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> SharedPrefixKV:
        """Row i's new key at response index row_steps[i]; all T positions read, masked per row: [b] rows."""
        b = key.shape[1]
        g = b // self.n
        k, v = self.key_value_memory_dict[layer]  # [R, ng, T, hn]
        k[self._row_index, :, self.row_steps] = key[0]
        v[self._row_index, :, self.row_steps] = value[0]
        pk, pv = self.prefix[layer]
        return SharedPrefixKV(pk[:g], pv[:g], self.prefix_keep[:g], [self.n] * g, k[:b], v[:b], True,
                              own_len=self.row_steps + 1)


def group_buckets(groups: int) -> GraphBuckets:
    """``GraphBuckets``' sizes (1, 2, 4, 8, 16, ...) in prompt groups, the largest cut to the slots there are."""
    return GraphBuckets(groups, sizes=[s for s in GraphBuckets(groups).sizes if s < groups] + [groups])


def step_rows(occupied: list[bool], n: int, buckets: GraphBuckets) -> int:
    """Rows a step computes: n x the smallest bucket (in groups) that holds the highest occupied group slot."""
    top = max((g + 1 for g, used in enumerate(occupied) if used), default=0)
    return 0 if top == 0 else n * buckets.bucket(top)


class FixedShapeDecoder:
    """The decode loop of one ``generate`` call on fixed slots (see the module docstring)."""

    def __init__(self, engine, prompts, batch, n: int, max_rows: int, graphs: bool = True):
        self.engine, self.prompts, self.batch, self.n = engine, prompts, batch, n
        self.L = batch.ids.shape[1]
        self.T = batch.real.shape[1] - self.L
        self.slots = Slots(len(prompts), n, max_rows)
        G = min(self.slots.cap // n, len(prompts))
        self.buckets = group_buckets(G)
        dev = engine.stages.device
        self.ctx = FixedSlotContext(G, n, self.L, self.T, dev)
        R = G * n
        self.group_prompt = [-1] * G  # prompt in each group slot (-1: free)
        self.rows = torch.zeros(R, dtype=torch.long)  # sample row of each slot (free: 0, ignored)
        self.steps = torch.zeros(R, dtype=torch.long)
        self.alive = torch.zeros(R, dtype=torch.bool)
        self.tok_in = torch.zeros(R, 1, dtype=torch.long, device=dev)  # static inputs of the step
        self.pos_in = torch.zeros(3, R, 1, dtype=torch.long, device=dev)
        self.steps_in = torch.zeros(R, dtype=torch.long, device=dev)
        self.logits = None  # [R, Vs] on the last stage
        self.graphs = {} if graphs and engine.stages.pp_size == 1 else None  # bucket rows -> replay | None
        self.pool = graph_pool(dev) if self.graphs is not None else None  # one pool for the loop's graphs
        self.stats = dict(admissions=0, steps=0, row_steps=0, wasted_row_steps=0, mixed_steps=0, peak_rows=0,
                          graph_steps=0)

    def prefill(self) -> None:
        self._admit()

    def _admit(self) -> None:
        """Prefill waiting prompts into the free group slots (lowest first)."""
        free = [g for g, p in enumerate(self.group_prompt) if p < 0]
        new = self.slots.waiting[:len(free)]
        if not new:
            return
        self.slots.waiting = self.slots.waiting[len(new):]
        slots, sel = free[:len(new)], torch.tensor(new)
        rows = (sel[:, None] * self.n + torch.arange(self.n)).flatten()
        b = self.batch
        sub = type(b)(b.ids[sel], b.positions[:, rows], b.real[rows], b.limits[rows], b.padded)
        pre = SharedPrefixContext(max_batch_size=len(new), max_sequence_length=self.L)
        logits = self.engine._prefill([self.prompts[i] for i in new], sub, pre)  # [k, Vs] last stage
        self.ctx.fill(slots, pre, sub.real[::self.n, :self.L])
        slot_rows = (torch.tensor(slots)[:, None] * self.n + torch.arange(self.n)).flatten()
        self.rows[slot_rows], self.steps[slot_rows], self.alive[slot_rows] = rows, 0, True
        for g, p in zip(slots, new):
            self.group_prompt[g] = p
        if logits is not None:
            if self.logits is None:
                self.logits = logits.new_zeros(len(self.rows), logits.shape[-1])
            self.logits[slot_rows.to(logits.device)] = logits.repeat_interleave(self.n, dim=0)
        self.stats["admissions"] += 1
        self.stats["peak_rows"] = max(self.stats["peak_rows"], int(self.alive.sum()))

    def decode(self, params, seed: int, row_offset: int = 0):
        out = Outputs(self.batch.positions.shape[1], self.T, self.engine.pad_id)
        while True:
            if self.slots.waiting:
                self._admit()
            b = step_rows([p >= 0 for p in self.group_prompt], self.n, self.buckets)
            if b == 0:
                break
            logits = None if self.logits is None else self.logits[:b]
            alive = self.alive[:b]  # a view: take() marks finished rows in self.alive
            tok = out.take(self.engine, logits, self.rows[:b], self.steps[:b], alive, self.batch.limits, params,
                           seed, row_offset)
            self._free_groups()
            if not bool(self.alive.any()) and not self.slots.waiting:
                break
            self._step(tok, b)
            self.steps[:b] += self.alive[:b].long()
        return out.result()

    def _free_groups(self) -> None:
        for g, p in enumerate(self.group_prompt):
            if p >= 0 and not bool(self.alive[g * self.n:(g + 1) * self.n].any()):
                self.group_prompt[g] = -1

    def _step(self, tok: torch.Tensor, b: int) -> None:
        """Fill the static inputs of the first b rows and run (or replay) the step: logits [b, Vs]."""
        L, dev = self.L, self.engine.stages.device
        self.tok_in[:b, 0].copy_(tok.to(dev))
        self.pos_in[:, :b, 0].copy_(self.batch.positions[:, self.rows[:b], L + self.steps[:b]].to(dev))
        self.steps_in[:b].copy_(self.steps[:b].to(dev))
        self.ctx.set_row_steps(self.steps_in[:b])
        self.ctx.sequence_len_offset = L + int(self.steps[:b].max())
        st = self.stats
        st["steps"], st["row_steps"] = st["steps"] + 1, st["row_steps"] + b
        st["wasted_row_steps"] += b - int(self.alive[:b].sum())
        st["mixed_steps"] += int(self.steps[:b].min() != self.steps[:b].max())
        run = self._graph(b)
        out = run() if run is not None else self._eager(b)
        if out is not None:
            self.logits[:b] = out

    def _eager(self, b: int):
        return self.engine.stages.forward(self.tok_in[:b], self.pos_in[:, :b], None, self.ctx, prefill=False)

    def _graph(self, b: int):
        """The captured step of bucket b (captured on first use), or None: run eagerly."""
        if self.graphs is None:
            return None
        if b not in self.graphs:
            self.graphs[b] = capture(lambda: self._eager(b), self.engine.stages.device, pool=self.pool)
        if self.graphs[b] is not None:
            self.stats["graph_steps"] += 1
        return self.graphs[b]
