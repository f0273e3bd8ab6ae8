"""Continuous batching for the engine's shared-prompt cache: a row cap, waiting prompts, per-row decode steps.

With ``max_rows`` (``rollout.max_batch_rows``) at most that many rows are in the KV cache at once. Prompts wait in
call order; whenever the rows still generating leave room for a whole prompt group (n rows), the next waiting
prompts are prefilled (a ``SharedPrefixContext`` of their own, copied into the running ``RunningContext``) and
their rows join the running batch at step 0 while the others go on. Each row therefore has its own step t_r:
its new key goes to response index t_r of its cache row, its attention reads its own keys up to t_r (a per-row
mask, ``SharedPrefixKV.own_len``), its position is the prompt's continued M-RoPE position at t_r, and its token
is drawn with ``step = t_r``. Row ids stay ``row_offset + prompt * n + sample`` whatever the admission order, and
the counter-based draws depend on (seed, row id, step) only, so a capped call returns what an uncapped one does.

Without a cap (0) every prompt is admitted at once and every row steps together: the static batch as before.
A finished row keeps its cache row (frozen at its last step, its further draws ignored) until compaction drops
it: once ``compact_fraction`` of the rows are done, or when dropping them lets a waiting prompt in.

Legend: P prompts, n rows per prompt, N = P*n rows, b rows in the running batch, L padded prompt length (the
longest prompt of the whole call, so every admitted prompt fits it), T most new tokens, Vs vocabulary shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_papo.rollout.base import RolloutOutput
from megatron_papo.rollout.kv_cache import RunningContext, SharedPrefixContext


class Slots:
    """Which prompts wait, and how many may join: whole prompt groups while the rows stay within the cap."""

    def __init__(self, num_prompts: int, n: int, max_rows: int = 0):
        self.n, self.cap = n, (max_rows if max_rows > 0 else num_prompts * n)
        if self.cap < n:
            raise ValueError(f"max_rows={max_rows} is below n={n}: one prompt's n rows must fit together; "
                             f"set rollout.max_batch_rows >= {n} (or 0: no cap)")
        self.waiting = list(range(num_prompts))

    def room(self, running: int) -> int:
        """Waiting prompts that fit next to ``running`` rows."""
        return min(len(self.waiting), max(0, self.cap - running) // self.n)

    def admit(self, running: int) -> list[int]:
        """Take the prompts that fit next to ``running`` rows off the queue (call order)."""
        k = self.room(running)
        taken, self.waiting = self.waiting[:k], self.waiting[k:]
        return taken


@dataclass
class Running:
    """The running batch: cache row r holds sample row rows[r] at response step steps[r]."""

    rows: torch.Tensor  # [b] int64 sample row ids (prompt-major, 0..N-1)
    steps: torch.Tensor  # [b] int64 response index of each row's next token (frozen once a row is done)
    alive: torch.Tensor  # [b] bool, False once the row finished
    logits: torch.Tensor | None  # [b, Vs] next-token logits on the last stage, None elsewhere

    @classmethod
    def empty(cls) -> "Running":
        z = torch.zeros(0, dtype=torch.long)
        return cls(z, z.clone(), torch.zeros(0, dtype=torch.bool), None)

    def select(self, keep: torch.Tensor) -> None:
        self.rows, self.steps, self.alive = self.rows[keep], self.steps[keep], self.alive[keep]

    def join(self, rows: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.rows = torch.cat([self.rows, rows])
        self.steps = torch.cat([self.steps, torch.zeros_like(rows)])
        self.alive = torch.cat([self.alive, torch.ones(len(rows), dtype=torch.bool)])
        if logits is not None:
            self.logits = logits if self.logits is None or not len(self.logits) else torch.cat([self.logits, logits])


class Outputs:
    """What a call's decode loop records for its N rows: tokens and log-probs [N, T], lengths and finish codes [N]
    (0: still generating)."""

    def __init__(self, N: int, T: int, pad_id: int):
        self.tokens = torch.full((N, T), pad_id, dtype=torch.long)
        self.logprobs, self.reason = torch.zeros(N, T), torch.zeros(N, dtype=torch.long)
        self.lengths = torch.zeros(N, dtype=torch.long)

    def take(self, engine, logits, rows, steps, alive, limits, params, seed: int, row_offset: int):
        """Draw a token for each of the b computed rows (sample rows ``rows`` at ``steps``; a finished row's draw
        is ignored), record the alive rows' tokens and finish codes, mark the rows that finished in ``alive``
        (in place). Returns the drawn tokens [b]."""
        tok, lp = engine._pick(logits, rows + row_offset, steps, params, seed)
        a = alive.nonzero().squeeze(-1)
        rows, steps = rows[a], steps[a]
        self.tokens[rows, steps], self.logprobs[rows, steps] = tok[a], lp[a]
        code = engine._finish(tok[a], rows, steps, self.tokens, limits, params)
        done = code > 0
        self.reason[rows[done]], self.lengths[rows[done]] = code[done], steps[done] + 1
        alive[a[done]] = False
        return tok

    def result(self):
        return self.tokens, self.logprobs, self.lengths, self.reason


class ContinuousDecoder:
    """One ``generate`` call's decode loop on the shared-prompt cache, with a row cap and refills."""

    def __init__(self, engine, prompts, batch, n: int, max_rows: int):
        self.engine, self.prompts, self.batch, self.n = engine, prompts, batch, n
        self.L = batch.ids.shape[1]
        self.T = batch.real.shape[1] - self.L
        self.slots = Slots(len(prompts), n, max_rows)
        cap = min(self.slots.cap, len(prompts) * n)
        # prompts held at most: each has a row left, and a group joins only when n slots are free
        # n = 1: each row's prompt and own keys in one buffer, read by one attention call (kv_cache.RunningContext)
        self.ctx = RunningContext(cap, min(len(prompts), cap - n + 1), self.L, self.T, joint=n == 1)
        self.run = Running.empty()
        # admissions (prefill rounds), decode forwards, rows they computed, of them rows already finished,
        # forwards with rows at different steps, most rows in the cache at once
        self.stats = dict(admissions=0, steps=0, row_steps=0, wasted_row_steps=0, mixed_steps=0, peak_rows=0)

    def prefill(self) -> None:
        """Admit the first prompts (every prompt without a cap)."""
        self._admit()

    def decode(self, params, seed: int, row_offset: int = 0):
        """(tokens [N, T], log-probs [N, T], lengths [N], finish codes [N]) of every row of the call."""
        run = self.run
        out = Outputs(self.batch.positions.shape[1], self.T, self.engine.pad_id)
        while True:
            if self.slots.waiting:
                self._admit()
            if not len(run.rows):
                break
            tok = out.take(self.engine, run.logits, run.rows, run.steps, run.alive, self.batch.limits, params, seed,
                           row_offset)
            if not bool(run.alive.any()) and not self.slots.waiting:
                break
            tok = self._compact(tok)
            run.logits = self._step(tok) if len(run.rows) else None
            run.steps = run.steps + run.alive.long()
        return out.result()

    def _admit(self) -> None:
        """Prefill the waiting prompts that fit and append their rows (step 0) to the running batch."""
        new = self.slots.admit(len(self.run.rows))
        if not new:
            return
        sel = torch.tensor(new)
        rows = (sel[:, None] * self.n + torch.arange(self.n)).flatten()  # [k*n] sample rows, prompt-major
        b = self.batch
        sub = type(b)(b.ids[sel], b.positions[:, rows], b.real[rows], b.limits[rows], b.padded)
        pre = SharedPrefixContext(max_batch_size=len(new), max_sequence_length=self.L)
        logits = self.engine._prefill([self.prompts[i] for i in new], sub, pre)  # [k, Vs] on the last stage
        self.ctx.admit(pre, sub.real[::self.n, :self.L], self.n)
        self.run.join(rows, None if logits is None else logits.repeat_interleave(self.n, dim=0))
        self.stats["admissions"] += 1
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.run.rows))

    def _compact(self, tok: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch and the cache once enough are done or a waiting prompt would fit."""
        run = self.run
        dead, alive = int((~run.alive).sum()), int(run.alive.sum())
        if not dead:
            return tok
        if dead < max(1, int(self.engine.compact_fraction * len(run.rows))) and not self.slots.room(alive):
            return tok
        keep = run.alive.nonzero().squeeze(-1)
        self.ctx.keep_rows(keep, width=int(run.steps.max()) + 1)  # written so far: positions < each row's step
        run.select(keep)
        return tok[keep]

    def _step(self, tok: torch.Tensor) -> torch.Tensor | None:
        """One decode forward of the running rows' newest tokens (each at its own response index)."""
        run, ctx, L = self.run, self.ctx, self.L
        pos = self.batch.positions[:, run.rows, L + run.steps][:, :, None]  # [3, b, 1]
        lo, hi = int(run.steps.min()), int(run.steps.max())
        st = self.stats
        st["steps"] += 1
        st["row_steps"] += len(run.rows)
        st["wasted_row_steps"] += int((~run.alive).sum())
        st["mixed_steps"] += int(lo != hi)
        if lo == hi:  # every row at the same step: the static batch's contiguous cache write
            ctx.set_row_steps(None)
        else:
            ctx.set_row_steps(run.steps.to(self.engine.stages.device), hi + 1)
        ctx.sequence_len_offset = L + hi
        return self.engine.decode_forward(tok[:, None], pos, ctx)  # lean or megatron's (MegatronEngine)


def concat_outputs(parts: list[RolloutOutput], pad_id: int) -> RolloutOutput:
    """Outputs of consecutive prompt chunks as one call's (``prompt_index`` continued, responses re-padded)."""
    T = max(p.response_ids.shape[1] for p in parts)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

    index, offset = [], 0
    for p in parts:
        index.append(p.prompt_index + offset)
        offset += int(p.prompt_index.max()) + 1 if len(p.prompt_index) else 0
    return RolloutOutput(
        sequences=[s for p in parts for s in p.sequences],
        response_ids=torch.cat([pad(p.response_ids, pad_id) for p in parts]),
        response_mask=torch.cat([pad(p.response_mask, False) for p in parts]),
        logprobs=torch.cat([pad(p.logprobs, 0.0) for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        prompt_index=torch.cat(index))
