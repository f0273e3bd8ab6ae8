"""The built-in rollout engine: batched generation with megatron-core's static KV cache, on any TP x PP layout.

How a call runs:
1. prefill: the distinct prompts, left-padded to one length, go through the model once (in chunks of
   ``prefill_batch_size``), images on the first stage only; the last position's logits give every sample's
   first token; each prompt's KV cache stays one copy shared by its n samples (``rollout.kv_cache``: keys
   stored rotated, the samples' attention reads the prompt part once per prompt), or, on a spec whose
   attention cannot share (not the local spec's), is copied to the n sample rows of megatron's static cache;
2. decode: one token per active row per step; M-RoPE positions continue from each prompt's largest position
   (Qwen2.5-VL's rope delta); tokens are sampled on the last stage from vocab-parallel logits and broadcast to
   every stage;
3. rows finish independently (EOS, a stop string, their token budget); finished rows are dropped from the KV
   cache and the batch once enough of them accumulate, so they stop costing compute.

Every rank of the model-parallel group returns the same ``RolloutOutput``. Greedy decoding gives the same
tokens at any TP x PP; sampling does too up to float rounding (draws are keyed by seed, row and step).

Legend: P prompts, N = P*n rows, b active rows, L padded prompt length, T most new tokens, S = L + T,
Vs vocabulary shard, h hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_papo.models.attention import RopeCachingSelfAttention, SDPAttention
from megatron_papo.rollout.base import RolloutOutput, empty_output
from megatron_papo.rollout.kv_cache import SharedPrefixContext
from megatron_papo.rollout.pipeline import Stages, eval_mode
from megatron_papo.rollout.sampling import SamplingParams, sample

_EOS, _STOP, _LENGTH = 1, 2, 3
_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


@dataclass
class _Batch:
    """Left-padded prompts: ids [P, L], positions [3, N, S] for prompt + response, key validity [N, S]."""

    ids: torch.Tensor
    positions: torch.Tensor
    real: torch.Tensor
    limits: torch.Tensor  # [N] token budget of each row
    padded: bool


class MegatronEngine:
    """``RolloutBackend`` on the megatron VLM this rank holds (the trainer's own weights, no copy).

    eos_ids: token ids that end a response (default: the tokenizer's ``eos_id``); tokenizer: needed for stop
    strings; max_seq_len: longest prompt + response a row may reach; pad_id: fills ``response_ids``;
    banned_ids: tokens never sampled (default: the model's image and vision-start tokens, which a response
    cannot contain: a sampled ``<|image_pad|>`` would make the next forward expect image features).
    """

    def __init__(self, model, *, max_seq_len: int, eos_ids: Sequence[int] | None = None, tokenizer=None,
                 pad_id: int | None = None, banned_ids: Sequence[int] | None = None, prefill_batch_size: int = 8,
                 compact_fraction: float = 0.25):
        if eos_ids is None:
            if tokenizer is None:
                raise ValueError("MegatronEngine needs eos_ids or a tokenizer (to read its eos_id)")
            eos_ids = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
        if max_seq_len < 2:
            raise ValueError(f"MegatronEngine: max_seq_len must be >= 2, got {max_seq_len}")
        self.stages = Stages(model)
        self.model = model
        layers = self.stages.model.language_model.decoder.layers
        # the shared-prompt, rotated-key cache (rollout.kv_cache) needs every layer's attention to take part
        # (the local spec's do); otherwise megatron's own static cache, prompt rows copied to their samples
        self.shared_cache = all(isinstance(layer.self_attention, RopeCachingSelfAttention)
                                and isinstance(layer.self_attention.core_attention, SDPAttention)
                                for layer in layers)
        self.tokenizer = tokenizer
        self.eos_ids = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long)
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)
        self.max_seq_len = max_seq_len
        self.prefill_batch_size = max(1, prefill_batch_size)
        self.compact_fraction = compact_fraction
        spec = self.stages.model.spec
        self.vocab_size = spec.vocab_size
        if banned_ids is None:
            banned_ids = [spec.image_token_id, spec.vision_start_token_id]
        self.banned_ids = torch.tensor(sorted(set(int(i) for i in banned_ids)), dtype=torch.long)

    # --- public -------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence, n: int, params: SamplingParams, seed: int,
                 row_offset: int = 0) -> RolloutOutput:
        """``row_offset``: the first row's id in the random streams (row i draws from ``row_offset + i``), so a
        caller that splits a fixed list of prompts into batches (or over ranks) gets the same draws per prompt."""
        self._validate(prompts, n, params)
        if not prompts or params.max_new_tokens == 0:
            return empty_output(prompts, n, self.pad_id)
        with eval_mode(self.model, torch.inference_mode):
            batch = self._layout(prompts, n, params.max_new_tokens)
            context = SharedPrefixContext if self.shared_cache else StaticInferenceContext
            ctx = context(max_batch_size=len(prompts), max_sequence_length=batch.real.shape[1])
            logits = self._prefill(prompts, batch, ctx)  # [P, Vs] on the last stage
            if logits is not None:
                logits = logits.repeat_interleave(n, dim=0)  # [N, Vs]
            L = batch.ids.shape[1]
            if self.shared_cache:
                ctx.share_prefix(L, n, batch.real[::n, :L], batch.real.shape[1] - L)
            else:
                _expand_cache(ctx, torch.arange(len(prompts)).repeat_interleave(n))
            tokens, logprobs, lengths, reasons = self._decode(logits, batch, ctx, params, seed, row_offset)
        return self._output(prompts, n, tokens, logprobs, lengths, reasons)

    # --- steps --------------------------------------------------------------------------------------------

    def _validate(self, prompts, n, params):
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer= to MegatronEngine")
        for i, p in enumerate(prompts):
            s = int(p.input_ids.numel())
            if s == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if s >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {s} tokens, no room left in max_seq_len={self.max_seq_len}; "
                                 "shorten it (data.max_prompt_length) or raise the engine's max_seq_len")

    def _layout(self, prompts, n, max_new_tokens) -> _Batch:
        lens = torch.tensor([int(p.input_ids.numel()) for p in prompts])
        num_p, L = len(prompts), int(lens.max())
        limits = torch.clamp(self.max_seq_len - lens, max=max_new_tokens)  # [P]
        T = int(limits.max())
        ids = torch.full((num_p, L), self.pad_id, dtype=torch.long)
        positions = torch.zeros(3, num_p, L + T, dtype=torch.long)
        real = torch.zeros(num_p, L + T, dtype=torch.bool)
        steps = torch.arange(1, T + 1)
        for i, p in enumerate(prompts):
            s = int(lens[i])
            ids[i, L - s:] = p.input_ids
            pos = self.stages.model.position_ids(p.input_ids[None], p.image_grid_thw)[:, 0]  # [3, s]
            positions[:, i, L - s:L] = pos
            positions[:, i, L:] = pos.max() + steps  # rope delta: every axis continues from the largest
            real[i, L - s:] = True
        rep = lambda t, d: t.repeat_interleave(n, dim=d)  # noqa: E731 - prompt rows -> sample rows
        return _Batch(ids, rep(positions, 1), rep(real, 0), rep(limits, 0), bool((lens < L).any()))

    def _prefill(self, prompts, batch: _Batch, ctx) -> torch.Tensor | None:
        L = batch.ids.shape[1]
        chunks = []
        n = batch.positions.shape[1] // len(prompts)
        for start in range(0, len(prompts), self.prefill_batch_size):
            rows = slice(start, min(start + self.prefill_batch_size, len(prompts)))
            chunk = prompts[rows]
            pv = [p.pixel_values for p in chunk if p.pixel_values is not None]
            grid = [p.image_grid_thw for p in chunk if p.image_grid_thw is not None]
            mask = None
            if batch.padded:  # a pad query attends to itself only, so no row of the softmax is empty
                real = batch.real[start * n:rows.stop * n:n, :L]  # [c, L]
                mask = ~(real[:, None, None, :] | torch.eye(L, dtype=torch.bool)[None, None])  # [c, 1, L, L]
            ctx.sequence_len_offset, ctx.batch_size_offset = 0, start
            ctx.enable_prefill_mode()
            chunks.append(self.stages.forward(
                batch.ids[rows], batch.positions[:, start * n:rows.stop * n:n, :L], mask, ctx, prefill=True,
                pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grid) if grid else None))
        ctx.sequence_len_offset, ctx.batch_size_offset = L, 0
        ctx.enable_decode_mode()
        return torch.cat(chunks) if self.stages.last else None

    def _decode(self, logits, batch: _Batch, ctx, params, seed, row_offset=0):
        N, L = batch.positions.shape[1], batch.ids.shape[1]
        T = batch.real.shape[1] - L
        tokens = torch.full((N, T), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(N, T)
        reason = torch.zeros(N, dtype=torch.long)  # 0 = running
        lengths = torch.zeros(N, dtype=torch.long)
        rows = torch.arange(N)  # cache row r holds sample rows[r]
        positions, real = batch.positions, batch.real
        for t in range(T):
            tok, lp = self._pick(logits, rows + row_offset, t, params, seed)
            tokens[rows, t], logprobs[rows, t] = tok, lp
            running = reason[rows] == 0
            reason[rows] = self._finish(tok, rows, t, tokens, batch.limits, params, reason[rows])
            active = running & (reason[rows] == 0)  # rows still generating after this token
            lengths[rows[running & ~active]] = t + 1
            if not bool(active.any()):
                break
            if int((~active).sum()) >= max(1, int(self.compact_fraction * len(rows))):
                keep = active.nonzero().squeeze(-1)
                if self.shared_cache:
                    ctx.keep_rows(keep, rows // (N // batch.ids.shape[0]))
                else:
                    _expand_cache(ctx, keep)
                rows, positions, real, tok = rows[keep], positions[:, keep], real[keep], tok[keep]
            S = L + t + 1
            if self.shared_cache:  # the cache holds the prompts' padding; new tokens get their own positions
                mask, pos = None, positions[:, :, S - 1:S]  # [3, b, 1]
            else:
                mask = ~real[:, None, None, :S] if batch.padded else None  # [b, 1, 1, S]
                pos = positions[:, :, :S]
            logits = self.stages.forward(tok[:, None], pos, mask, ctx, prefill=False)
            ctx.sequence_len_offset += 1
        return tokens, logprobs, lengths, reason

    def _pick(self, logits, rows, t, params, seed):
        """Sample on the last stage, hand (token, log-prob) to every stage: ([b] int64, [b] float32)."""
        picked = None
        if self.stages.last:
            logits = self._ban(logits)
            tok, lp = sample(logits, params, seed=seed, row_ids=rows, step=t, vocab_size=self.vocab_size)
            picked = torch.stack([tok.double(), lp.double()], -1)
        picked = self.stages.broadcast_from_last(picked, (len(rows), 2), torch.float64)
        return picked[:, 0].long(), picked[:, 1].float()

    def _ban(self, logits):  # [b, Vs] this rank's shard
        start = self.stages.tp_rank * logits.shape[-1]
        local = self.banned_ids[(self.banned_ids >= start) & (self.banned_ids < start + logits.shape[-1])] - start
        # in place: the engine owns these logits (a fresh model output or its per-sample copy)
        return logits.index_fill_(-1, local, float("-inf")) if local.numel() else logits

    def _finish(self, tok, rows, t, tokens, limits, params, reason):
        """Finish code per active row after its (t+1)-th token; rows already finished keep theirs."""
        new = torch.where(torch.isin(tok, self.eos_ids), _EOS, 0)
        if params.stop:
            longest = max(len(s) for s in params.stop) + 2
            for r in (new == 0).nonzero().squeeze(-1).tolist():
                tail = self.tokenizer.decode(tokens[rows[r], max(0, t + 1 - longest):t + 1].tolist())
                if any(s in tail for s in params.stop):
                    new[r] = _STOP
        new = torch.where((new == 0) & (t + 1 >= limits[rows]), _LENGTH, new)
        return torch.where(reason > 0, reason, new)

    def _output(self, prompts, n, tokens, logprobs, lengths, reason) -> RolloutOutput:
        T = int(lengths.max()) if len(lengths) else 0
        mask = torch.arange(T)[None, :] < lengths[:, None]  # [N, T]
        response = torch.where(mask, tokens[:, :T], torch.full_like(tokens[:, :T], self.pad_id))
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        seqs = [torch.cat([prompts[int(i)].input_ids, response[k, :int(lengths[k])]])
                for k, i in enumerate(prompt_index)]
        # built outside inference mode: plain tensors the trainer may use in autograd
        return RolloutOutput(seqs, response, mask, torch.where(mask, logprobs[:, :T], 0.0), lengths.clone(),
                             [_REASONS[int(r)] for r in reason], prompt_index)


def _expand_cache(ctx: StaticInferenceContext, index: torch.Tensor) -> None:
    """Keep / repeat KV-cache rows: new row r = old row index[r] (expanding prompts to samples, compacting)."""
    for layer, (k, v) in ctx.key_value_memory_dict.items():  # [S, b, ng, hn] each
        ctx.key_value_memory_dict[layer] = (k.index_select(1, index), v.index_select(1, index))
