"""The built-in rollout engine: batched generation with megatron-core's static KV cache, on any TP x PP layout.

How a call runs:
1. prefill: the distinct prompts, left-padded to one length, go through the model once (in chunks of
   ``prefill_batch_size`` prompts and ``PREFILL_CHUNK_TOKENS`` tokens at most), the last layer on each
   prompt's last position only (``rollout.prefill``), images on the first stage only; the last position's
   logits give every sample's first token; each prompt's KV cache stays one copy shared by its n samples
   (``rollout.kv_cache``: keys stored rotated, the samples' attention reads the prompt part once per prompt),
   or, on a spec whose attention cannot share (not the local spec's), is copied to the n sample rows of
   megatron's static cache;
2. decode: one token per active row per step; M-RoPE positions continue from each prompt's largest position
   (Qwen2.5-VL's rope delta); tokens are sampled on the last stage from vocab-parallel logits and broadcast to
   every stage; on the local spec at TP = 1, PP = 1 a step is computed directly from the layers' weights
   (``rollout.lean_decode``; ``lean_decode=False`` turns it off), otherwise by megatron's forward;
3. rows finish independently (EOS, a stop string, their token budget); finished rows are dropped from the KV
   cache and the batch once enough of them accumulate, so they stop costing compute;
4. with a row cap (``max_rows``, ``rollout.max_batch_rows``) at most that many rows are in flight: prompts wait
   and join the running batch as whole groups when rows finish (continuous batching, ``rollout.scheduler``; on
   megatron's own cache: consecutive static waves of ``max_rows // n`` prompts). Same outputs as without a cap.

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

from megatron_papo.models.common.attention import RopeCachingSelfAttention, SDPAttention
from megatron_papo.models.fp8_padding import fp8_off
from megatron_papo.rollout.base import RolloutOutput, empty_output
from megatron_papo.rollout.fast_decode import packed_linears
from megatron_papo.rollout.graph_decode import FixedShapeDecoder
from megatron_papo.rollout.lean_decode import LeanDecodeStep
from megatron_papo.rollout.pipeline import Stages, eval_mode
from megatron_papo.rollout.prefill import LastPositionLayer, last_layer_at_last_position
from megatron_papo.rollout.sampling import SamplingParams, sample
from megatron_papo.rollout.scheduler import ContinuousDecoder, Outputs, concat_outputs

_EOS, _STOP, _LENGTH = 1, 2, 3
# prompt tokens per prefill chunk at most: the chunk's activations (the MLP's [tokens, 2 x intermediate]) stay in
# the last-level cache; measured on the benchmark's model (256-token prompts, one thread): 4 prompts per chunk
# 4.3 s, 8 prompts 4.65 s, 2 prompts 4.45 s for 32 prompts
PREFILL_CHUNK_TOKENS = 1024
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
    packed_weights: on CPU, run the linear layers on weights prepacked once per call (``fast_decode``);
    banned_ids: tokens never sampled (default: the model's image and vision-start tokens, and the tokenizer's
    vision-end token when a tokenizer is given: the trainer's list; a sampled ``<|image_pad|>`` would make the
    next forward expect image features);
    max_rows: rows in flight at most, their KV cache included (0: every row of a call at once; else >= n);
    fixed_shape: decode on fixed-size buffers (``rollout.graph_decode``), each step captured as a CUDA graph per
    batch bucket where the device allows (same outputs; on CPU only slower, it reads all T response positions);
    cuda_graphs: with fixed_shape, whether to capture (False: the same fixed-shape steps, eager);
    lean_decode: decode steps on the shared-prompt cache computed directly from the layers' weights
    (``rollout.lean_decode``: same logits, less per-module overhead) where the model allows it (local spec,
    TP = 1, PP = 1, no sequence parallelism, no module hooks it would bypass; the VLM's own forward hooks, such
    as the trainer's banned vision tokens, act on its logits too); False, or any other model: megatron's forward.
    """

    def __init__(self, model, *, max_seq_len: int, eos_ids: Sequence[int] | None = None, tokenizer=None,
                 pad_id: int | None = None, banned_ids: Sequence[int] | None = None, prefill_batch_size: int = 8,
                 compact_fraction: float = 0.25, packed_weights: bool = True, max_rows: int = 0,
                 fixed_shape: bool = False, cuda_graphs: bool = True, lean_decode: bool = True):
        if eos_ids is None:
            if tokenizer is None:
                raise ValueError("MegatronEngine needs eos_ids or a tokenizer (to read its eos_id)")
            eos_ids = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
        if max_seq_len < 2:
            raise ValueError(f"MegatronEngine: max_seq_len must be >= 2, got {max_seq_len}")
        if max_rows < 0:
            raise ValueError(f"MegatronEngine: max_rows must be >= 0 (0: no cap), got {max_rows}")
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
        self.packed_weights = packed_weights  # CPU: matmuls on weights prepacked once per call (fast_decode)
        self.max_rows = max_rows  # rows in flight at most (0: every row of a call at once)
        if fixed_shape and not self.shared_cache:
            raise ValueError("MegatronEngine: fixed_shape decode needs the shared-prompt cache (the local layer "
                             "spec's attention); use fixed_shape=False with this spec")
        self.fixed_shape = fixed_shape  # decode on fixed buffers, CUDA graphs per bucket (rollout.graph_decode)
        self.cuda_graphs = cuda_graphs  # fixed_shape: capture the steps where the device can (False: eager)
        # the decode step of the shared-prompt cache, chosen once by capability (rollout.lean_decode)
        self.lean_decode = lean_decode and self.shared_cache and LeanDecodeStep.supports(self.stages)
        self._lean = LeanDecodeStep(self.stages.model) if self.lean_decode else None
        self.decode_forward = self._lean_step if self.lean_decode else self._megatron_step
        # the prefill's last layer on each prompt's last position only (rollout.prefill), chosen by capability
        self.prefill_last_position = (self.shared_cache and self.stages.last and bool(len(layers))
                                      and LastPositionLayer.supports(layers[-1]))
        self.last_stats: dict = {}  # the last call's scheduling counts (rollout.scheduler.ContinuousDecoder)
        spec = self.stages.model.spec
        self.vocab_size = spec.vocab_size
        if banned_ids is None:  # the trainer's list (training.banned_tokens), vision-end read from the tokenizer
            banned_ids = [spec.image_token_id, spec.vision_start_token_id,
                          *([tokenizer.vision_end_id] if getattr(tokenizer, "vision_end_id", None) is not None else [])]
        self.banned_ids = torch.tensor(sorted(set(int(i) for i in banned_ids)), dtype=torch.long)

    # --- public -------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence, n: int, params: SamplingParams, seed: int,
                 row_offset: int = 0) -> RolloutOutput:
        """``row_offset``: the first row's id in the random streams (row i draws from ``row_offset + i``), so a
        caller that splits a fixed list of prompts into batches (or over ranks) gets the same draws per prompt."""
        self._validate(prompts, n, params)
        if not prompts or params.max_new_tokens == 0:
            return empty_output(prompts, n, self.pad_id)
        if not self.shared_cache and 0 < self.max_rows < len(prompts) * n:  # megatron's cache: static waves
            per = self.max_rows // n
            return concat_outputs([self.generate(prompts[i:i + per], n, params, seed, row_offset + i * n)
                                   for i in range(0, len(prompts), per)], self.pad_id)
        rows = min(len(prompts) * n, self.max_rows or len(prompts) * n)
        with eval_mode(self.model, torch.inference_mode), fp8_off(self.stages.model), packed_linears(
                self.stages.model.language_model, rows, self.packed_weights):  # fp8 off: unaligned counts
            batch = self._layout(prompts, n, params.max_new_tokens)
            if self.fixed_shape:
                decoder = FixedShapeDecoder(self, prompts, batch, n, self.max_rows, graphs=self.cuda_graphs)
            elif self.shared_cache:
                decoder = ContinuousDecoder(self, prompts, batch, n, self.max_rows)
            else:
                decoder = _StaticDecoder(self, prompts, batch, n)
            decoder.prefill()  # the first prompts (all of them without a cap); refills happen inside the loop
            tokens, logprobs, lengths, reasons = self._decode(decoder, params, seed, row_offset)
            self.last_stats = getattr(decoder, "stats", {})  # the shared cache's scheduling counts
        return self._output(prompts, n, tokens, logprobs, lengths, reasons)

    # --- steps --------------------------------------------------------------------------------------------

    def _validate(self, prompts, n, params):
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        if 0 < self.max_rows < n:
            raise ValueError(f"max_rows={self.max_rows} is below n={n}: one prompt's n rows must fit together; "
                             f"set rollout.max_batch_rows >= {n} (or 0: no cap)")
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
        per = max(1, min(self.prefill_batch_size, PREFILL_CHUNK_TOKENS // L))
        for start in range(0, len(prompts), per):
            rows = slice(start, min(start + per, len(prompts)))
            chunk = prompts[rows]
            pv = [p.pixel_values for p in chunk if p.pixel_values is not None]
            grid = [p.image_grid_thw for p in chunk if p.image_grid_thw is not None]
            mask = None
            if batch.padded:  # a pad query attends to itself only, so no row of the softmax is empty
                real = batch.real[start * n:rows.stop * n:n, :L]  # [c, L]
                mask = ~(real[:, None, None, :] | torch.eye(L, dtype=torch.bool)[None, None])  # [c, 1, L, L]
            ctx.sequence_len_offset, ctx.batch_size_offset = 0, start
            ctx.enable_prefill_mode()
            with last_layer_at_last_position(self.stages.model.language_model.decoder, self.prefill_last_position):
                chunks.append(self.stages.forward(
                    batch.ids[rows], batch.positions[:, start * n:rows.stop * n:n, :L], mask, ctx, prefill=True,
                    pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grid) if grid else None))
        ctx.sequence_len_offset, ctx.batch_size_offset = L, 0
        ctx.enable_decode_mode()
        return torch.cat(chunks) if self.stages.last else None

    def _megatron_step(self, ids, position_ids, ctx):
        """One decode step through megatron's forward: ids [b, 1], position_ids [3, b, 1] -> logits [b, Vs]."""
        return self.stages.forward(ids, position_ids, None, ctx, prefill=False)

    def _lean_step(self, ids, position_ids, ctx):
        """The same step computed directly from the layers' weights (``LeanDecodeStep``)."""
        dev = self.stages.device
        return self._lean(ids.to(dev), position_ids.to(dev), ctx)

    def _decode(self, decoder, params, seed, row_offset=0):
        """The decode loop, a method of its own (benchmarks/rollout_profile.py times it): (tokens [N, T],
        log-probs [N, T], lengths [N], finish codes [N])."""
        return decoder.decode(params, seed, row_offset)

    def _decode_static(self, logits, batch: _Batch, ctx, params, seed, row_offset=0):
        """The static batch on megatron's cache (``_StaticDecoder``): one global step t, finished rows compacted;
        tokens and finish codes recorded as the shared cache's loops record them (``scheduler.Outputs``)."""
        N, L = batch.positions.shape[1], batch.ids.shape[1]
        out = Outputs(N, batch.real.shape[1] - L, self.pad_id)
        rows = torch.arange(N)  # cache row r holds sample row rows[r]
        alive = torch.ones(N, dtype=torch.bool)
        positions, real = batch.positions, batch.real
        for t in range(out.tokens.shape[1]):
            tok = out.take(self, logits, rows, torch.full_like(rows, t), alive, batch.limits, params, seed,
                           row_offset)
            if not bool(alive.any()):
                break
            if int((~alive).sum()) >= max(1, int(self.compact_fraction * len(rows))):
                keep = alive.nonzero().squeeze(-1)
                _expand_cache(ctx, keep)
                rows, alive, positions, real, tok = rows[keep], alive[keep], positions[:, keep], real[keep], tok[keep]
            S = L + t + 1
            mask = ~real[:, None, None, :S] if batch.padded else None  # [b, 1, 1, S]
            logits = self.stages.forward(tok[:, None], positions[:, :, :S], mask, ctx, prefill=False)
            ctx.sequence_len_offset += 1
        return out.result()

    def _pick(self, logits, rows, steps, params, seed):
        """Sample on the last stage, hand (token, log-prob) to every stage: ([b] int64, [b] float32); ``steps``:
        each row's response index (an int when they share one)."""
        picked = None
        if self.stages.last:
            logits = self._ban(logits)
            step = steps.to(logits.device) if torch.is_tensor(steps) else steps
            tok, lp = sample(logits, params, seed=seed, row_ids=rows.to(logits.device), step=step,
                             vocab_size=self.vocab_size)
            picked = torch.stack([tok.double(), lp.double()], -1)
        picked = self.stages.broadcast_from_last(picked, (len(rows), 2), torch.float64).cpu()
        return picked[:, 0].long(), picked[:, 1].float()

    def _ban(self, logits):  # [b, Vs] this rank's shard
        start = self.stages.tp_rank * logits.shape[-1]
        banned = self.banned_ids.to(logits.device)
        local = banned[(banned >= start) & (banned < start + logits.shape[-1])] - start
        # in place: the engine owns these logits (a fresh model output or its per-sample copy)
        return logits.index_fill_(-1, local, float("-inf")) if local.numel() else logits

    def _finish(self, tok, rows, steps, tokens, limits, params):
        """Finish code of each row (0: goes on) after its token at response index steps[r] ([b] each)."""
        new = torch.where(torch.isin(tok, self.eos_ids), _EOS, 0)
        if params.stop:
            longest = max(len(s) for s in params.stop) + 2
            for r in (new == 0).nonzero().squeeze(-1).tolist():
                t = int(steps[r])
                tail = self.tokenizer.decode(tokens[rows[r], max(0, t + 1 - longest):t + 1].tolist())
                if any(s in tail for s in params.stop):
                    new[r] = _STOP
        return torch.where((new == 0) & (steps + 1 >= limits[rows]), _LENGTH, new)

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


class _StaticDecoder:
    """megatron's own static cache: every row of the call at once, prompt rows copied to their samples."""

    def __init__(self, engine, prompts, batch, n):
        self.engine, self.prompts, self.batch, self.n = engine, prompts, batch, n

    def prefill(self) -> None:
        self.ctx = StaticInferenceContext(max_batch_size=len(self.prompts),
                                          max_sequence_length=self.batch.real.shape[1])
        self.logits = self.engine._prefill(self.prompts, self.batch, self.ctx)  # [P, Vs] on the last stage
        if self.logits is not None:
            self.logits = self.logits.repeat_interleave(self.n, dim=0)  # [N, Vs]
        _expand_cache(self.ctx, torch.arange(len(self.prompts)).repeat_interleave(self.n))

    def decode(self, params, seed, row_offset):
        return self.engine._decode_static(self.logits, self.batch, self.ctx, params, seed, row_offset)


def _expand_cache(ctx: StaticInferenceContext, index: torch.Tensor) -> None:
    """Keep / repeat KV-cache rows: new row r = old row index[r] (expanding prompts to samples, compacting)."""
    for layer, (k, v) in ctx.key_value_memory_dict.items():  # [S, b, ng, hn] each
        idx = index.to(k.device)
        ctx.key_value_memory_dict[layer] = (k.index_select(1, idx), v.index_select(1, idx))
