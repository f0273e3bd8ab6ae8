"""No-grad per-token log-probs of the response tokens (the scoring pass), two implementations with one signature,
chosen once at build time by :func:`select_logprobs_fn`:

- ``schedule_logprobs``: every row (prompt + response) through megatron's forward-only schedule. Works at any
  TP x PP, with either layer spec.
- ``prefix_shared_logprobs`` (PP = 1, local spec, no sequence parallelism): the n rows of a prompt share their
  prompt, and with the masked image too (the same masked image for the prompt's n rollouts). Each distinct
  prompt (ids + images) is run ONCE (prefill: vision tower and prompt tokens, keys kept with RoPE applied in a
  ``SharedPrefixContext``), then all rows' response tokens go through the model in one forward whose attention
  reads the prompt's keys once per prompt (``SDPAttention`` shared-prefix attention, causal within the
  response, exact two-part softmax merge). The prompt is ~80% of a row's tokens, so this is most of the work
  of a scoring forward saved. Same values as the schedule path up to float rounding (tests/test_scoring.py).

Legend: N rows, T padded response length (a chunk's: its longest response), P distinct prompts of a chunk,
L their padded (left) length,
Vs = V/tp vocabulary shard.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_papo.ops import vocab_parallel_log_probs
from megatron_papo.rollout.kv_cache import SharedPrefixContext
from megatron_papo.rollout.pipeline import eval_mode, unwrap, vocab_parallel_inference
from megatron_papo.training.packing import micro_batches, unpack_rows
from megatron_papo.training.sequences import Rows, response_lengths, response_stats, run_schedule

# (model, rows, micro_batch_size, pad_id, image_token_id, temperature) -> [N, T] float32, None off the last stage
LogprobsFn = Callable[..., Optional[torch.Tensor]]


def schedule_logprobs(model, rows: Rows, micro_batch_size: int, pad_id: int, image_token_id: Optional[int],
                      temperature: float, max_tokens: int = 0) -> Optional[torch.Tensor]:
    """Plain rows through megatron's forward-only schedule (any PP): [N, T] on the last stage, else None.
    ``max_tokens`` > 0 packs the rows into micro-batches of that many tokens (``training.packing``)."""
    keep = lambda logits, mb: (torch.zeros(()), {"logp": response_stats(logits, mb, temperature)[0]})  # noqa: E731
    mbs = micro_batches(rows, micro_batch_size, pad_id, max_tokens=max_tokens, image_token_id=image_token_id)
    out = run_schedule(model, mbs, keep, forward_only=True)
    return unpack_rows([o["logp"].detach().cpu() for o in out], mbs, len(rows)) if out else None


def prefix_shared_logprobs(model, rows: Rows, micro_batch_size: int, pad_id: int, image_token_id: Optional[int],
                           temperature: float) -> torch.Tensor:
    """Each distinct prompt once, then every row's response against it (PP = 1): [N, T] float32.

    Chunks hold whole prompt groups, about ``micro_batch_size`` rows each (a group bigger than that is a chunk).
    """
    vlm = unwrap(model)
    groups = prompt_groups(rows)
    out = []
    with eval_mode(vlm):
        for chunk in _chunks(groups, micro_batch_size):
            out.append(_score_chunk(vlm, rows, chunk, pad_id, image_token_id, temperature))
    return torch.cat(out) if out else torch.zeros(0, rows.response_ids.shape[1])


def prompt_groups(rows: Rows) -> list[tuple[int, int]]:
    """(first row, row count) of each run of consecutive rows with the same prompt ids and images."""
    groups: list[list[int]] = []
    for i in range(len(rows)):
        if groups and _same_prompt(rows, groups[-1][0], i):
            groups[-1][1] += 1
        else:
            groups.append([i, 1])
    return [(s, c) for s, c in groups]


def _same_prompt(rows: Rows, i: int, j: int) -> bool:
    same = lambda a, b: a is b or (a is not None and b is not None and a.shape == b.shape  # noqa: E731
                                   and torch.equal(a, b))
    (pv_i, grid_i), (pv_j, grid_j) = rows.images[i], rows.images[j]
    return same(rows.prompt_ids[i], rows.prompt_ids[j]) and same(pv_i, pv_j) and same(grid_i, grid_j)


def _chunks(groups: list, rows_per_chunk: int) -> list[list]:
    chunks, cur, size = [], [], 0
    for g in groups:
        if cur and size + g[1] > rows_per_chunk:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += g[1]
    return chunks + ([cur] if cur else [])


def _score_chunk(vlm, rows: Rows, groups: list, pad_id: int, image_token_id: Optional[int],
                 temperature: float) -> torch.Tensor:
    """Log-probs [n_c, T] of the rows of ``groups`` (consecutive): prefill of their prompts, then responses."""
    first, counts = [s for s, _ in groups], [c for _, c in groups]
    idx = [s + j for s, c in groups for j in range(c)]
    prompts = [rows.prompt_ids[s] for s in first]
    lens = [int(p.numel()) for p in prompts]
    full_t = rows.response_ids.shape[1]
    num_p, L, T = len(prompts), max(lens), max(1, int(response_lengths(rows.response_mask[idx]).max()))
    dev = next(vlm.parameters()).device
    ids = torch.full((num_p, L), pad_id, dtype=torch.long)
    pos = torch.zeros(3, num_p, L, dtype=torch.long)            # prompts' M-RoPE positions, left-padded
    resp_pos = torch.zeros(3, len(idx), T, dtype=torch.long)    # responses continue from each prompt's largest
    keep = torch.zeros(num_p, L, dtype=torch.bool)               # True = a real prompt token
    row = 0
    for i, (p, s) in enumerate(zip(prompts, lens)):
        ids[i, L - s:] = p
        p_pos = vlm.position_ids(p[None], rows.images[first[i]][1])[:, 0]  # [3, s]
        pos[:, i, L - s:] = p_pos
        resp_pos[:, row:row + counts[i]] = p_pos.max() + 1 + torch.arange(T)
        keep[i, L - s:] = True
        row += counts[i]
    mask = None
    if not bool(keep.all()):  # a pad query attends to itself only, so no row of the softmax is empty
        mask = ~(keep[:, None, None, :] | torch.eye(L, dtype=torch.bool)[None, None])  # [P, 1, L, L]
    pvs = [rows.images[s][0] for s in first if rows.images[s][0] is not None]
    grids = [rows.images[s][1] for s in first if rows.images[s][1] is not None]
    ctx = SharedPrefixContext(max_batch_size=num_p, max_sequence_length=L + T)
    mv = lambda x: None if x is None else x.to(dev)  # noqa: E731
    # full-vocabulary logits of the last prompt position only (megatron gathers them for [P, 1]), this rank's shard
    last = vlm(ids.to(dev), pos.to(dev), mv(mask), pixel_values=mv(torch.cat(pvs)) if pvs else None,
               image_grid_thw=mv(torch.cat(grids)) if grids else None, inference_context=ctx,
               runtime_gather_output=True)[:, -1]                # [P, V]
    last = _local_shard(last)                                    # [P, Vs]
    ctx.share_prefix(L, counts, keep.to(dev), T)
    ctx.sequence_len_offset = L
    ctx.enable_decode_mode()
    targets = rows.response_ids[idx, :T]                         # [n_c, T] the chunk's longest response
    inputs = targets.masked_fill(targets == image_token_id, pad_id) if image_token_id is not None else targets
    with vocab_parallel_inference(vlm.language_model):
        resp = vlm(inputs.to(dev), resp_pos.to(dev), None, inference_context=ctx)  # [n_c, T, Vs]
    first_logits = last.repeat_interleave(torch.tensor(counts, device=dev), dim=0)[:, None]  # [n_c, 1, Vs]
    logits = torch.cat([first_logits, resp[:, :T - 1]], dim=1)   # position t predicts response token t
    logp = vocab_parallel_log_probs(logits, targets.to(dev), temperature=temperature).float().cpu()
    return torch.nn.functional.pad(logp, (0, full_t - T))       # [n_c, full T]


def _local_shard(full: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=-1)[parallel_state.get_tensor_model_parallel_rank()] if tp > 1 else full


def prefix_sharing_supported(cfg) -> tuple[bool, str]:
    """Whether the prefix-shared scoring path can run with this config, and why not."""
    if cfg.parallel.pipeline_model_parallel_size != 1:
        return False, "pipeline parallelism (scoring goes through megatron's schedule)"
    if cfg.model.transformer_impl != "local":
        return False, "the transformer_engine spec (its attention has no shared-prefix path)"
    if cfg.parallel.sequence_parallel:
        return False, "sequence parallelism"
    return True, ""


def select_logprobs_fn(cfg) -> LogprobsFn:
    """The scoring implementation for this run, decided once when the run is built (``training.prefix_scoring``
    asks for the prefix-shared path; it is used where :func:`prefix_sharing_supported`). The schedule path packs
    rows when ``training.max_tokens_per_micro_batch`` > 0, with twice that budget (no activations are kept)."""
    if cfg.training.prefix_scoring and prefix_sharing_supported(cfg)[0]:
        return prefix_shared_logprobs
    budget = cfg.training.max_tokens_per_micro_batch
    return partial(schedule_logprobs, max_tokens=2 * budget) if budget else schedule_logprobs
