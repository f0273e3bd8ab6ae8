"""Sequence packing: micro-batches formed by a token budget instead of a row count, without padding.

RL responses range from a few tokens to thousands, so padding every row of a micro-batch to the longest one
computes mostly padding. With ``training.max_tokens_per_micro_batch`` > 0 the rows (prompt + response, each cut
at its last response token) are placed into bins of at most that many tokens (first-fit decreasing), and each
bin becomes ONE sequence: its rows back to back, each with its own M-RoPE positions (from 0, as if alone) and
causal attention confined to itself (block-diagonal causal). That is megatron's packed-sequence input,
``PackedSeqParams`` with ``qkv_format="thd"`` and the rows' boundaries in ``cu_seqlens``: Transformer Engine's
attention reads it natively on GPUs, and the local spec's ``SDPAttention`` runs one causal SDPA per row. The
rotary tables cover every token of the packed sequence (M-RoPE from per-row position ids), so megatron's
(unfused) ``thd`` rotary takes each token's own angle; ``apply_rope_fusion`` stays off (TE's fused ``thd``
kernel would restart positions per sequence and ignore the image positions).

Under pipeline parallelism every micro-batch of a call has the same length (the budget; stages exchange
fixed-size activations): the unused tail is padding, a sequence of its own that no row attends to. At PP = 1 a
micro-batch is as long as its rows (rounded up to a multiple of TP, for sequence parallelism). How rows are
binned never changes the loss: the global token-mean divides by the response tokens of the whole optimizer
batch (``algorithms.aggregation``).

Legend: N rows, T padded response length, S a micro-batch's packed length, r rows in a micro-batch, k packed
sequences in a micro-batch (1, or 2 with the masked copy of :func:`sequences.pair`), P image patches.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_papo.training.sequences import MicroBatch, Rows, pack, response_lengths, seq_len, tp_multiple


def micro_batches(rows: Rows, micro_batch_size: int, pad_id: int, *, max_tokens: int = 0,
                  seq_length: Optional[int] = None, tokens: Optional[dict] = None,
                  image_token_id: Optional[int] = None, one_shape: Optional[bool] = None) -> list[MicroBatch]:
    """The micro-batches of ``rows``: padded rows, ``micro_batch_size`` per micro-batch (``max_tokens`` = 0), or
    packed bins of at most ``max_tokens`` tokens. ``tokens`` maps names to [N, T] tensors sliced alongside.
    ``one_shape`` (default: under pipeline parallelism) pads every packed micro-batch to ``max_tokens``."""
    if not max_tokens:
        return pack(rows, micro_batch_size, pad_id, seq_length or seq_len(rows), tokens, image_token_id)
    ready = parallel_state.model_parallel_is_initialized()
    if one_shape is None:
        one_shape = ready and parallel_state.get_pipeline_model_parallel_world_size() > 1
    lengths = row_lengths(rows)
    bins = first_fit_decreasing(lengths.tolist(), max_tokens)
    size = lambda b: max_tokens if one_shape else tp_multiple(int(lengths[b].sum()))  # noqa: E731
    return [_packed_micro_batch(rows, b, lengths, pad_id, tokens or {}, image_token_id, size(b)) for b in bins]


def update_micro_batch_rows(rows: Rows, rows_per_update: int, micro_batch_size: int, max_tokens: int) -> list:
    """Each update micro-batch's rows (indices into ``rows``) as the schedule runs them: every mini-batch of
    ``rows_per_update`` consecutive rows split as :func:`micro_batches` splits it (row counts, or bins)."""
    lengths, out = row_lengths(rows), []
    for a in range(0, len(rows), rows_per_update):
        n = min(rows_per_update, len(rows) - a)
        parts = (first_fit_decreasing(lengths[a:a + n].tolist(), max_tokens) if max_tokens else
                 [range(b, min(b + micro_batch_size, n)) for b in range(0, n, micro_batch_size)])
        out += [[a + i for i in part] for part in parts]
    return out


def row_lengths(rows: Rows) -> torch.Tensor:
    """[N] tokens of each row when packed: its prompt and its response up to the last response token."""
    return torch.tensor([int(p.numel()) for p in rows.prompt_ids]) + response_lengths(rows.response_mask)


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices of each bin: longest rows first, each into the first bin with room (within 11/9 of the
    fewest bins possible); every bin's rows sum to at most ``budget``."""
    too_long = [n for n in lengths if n > budget]
    if too_long:
        raise ValueError(f"a row of {max(too_long)} tokens (prompt + response) does not fit in "
                         f"training.max_tokens_per_micro_batch={budget}; raise it to at least "
                         "data.max_prompt_length + rollout.max_new_tokens")
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        slot = next((b for b, left in enumerate(room) if left >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def _packed_micro_batch(rows: Rows, idx: list[int], lengths: torch.Tensor, pad_id: int, tokens: dict,
                        image_token_id: Optional[int], length: int) -> MicroBatch:
    """Rows ``idx`` back to back in one sequence [1, S = ``length``], padded after them."""
    t = rows.response_ids.shape[1]
    ids, targets, resp_index, bounds, pvs, grids = [], [], [], [0], [], []
    for i in idx:
        p, n = rows.prompt_ids[i], int(lengths[i])
        seq = torch.cat([p, rows.response_ids[i]])[:n]                        # [n_i]
        if image_token_id is not None:            # a sampled image token is fed as padding, scored as itself
            seq = torch.cat([p, seq[p.numel():].masked_fill(seq[p.numel():] == image_token_id, pad_id)])
        ids.append(seq)
        targets.append(torch.cat([torch.cat([p, rows.response_ids[i]])[1:n], torch.tensor([pad_id])]))
        resp_index.append((bounds[-1] + p.numel() - 1 + torch.arange(t)).clamp(max=bounds[-1] + n - 1))
        bounds.append(bounds[-1] + n)
        pv, grid = rows.images[i]
        if pv is not None:
            pvs.append(pv)
            grids.append(grid)
    total = bounds[-1]
    if length > total:                            # the padding tail: a sequence of its own
        ids.append(torch.full((length - total,), pad_id, dtype=torch.long))
        targets.append(torch.full((length - total,), pad_id, dtype=torch.long))
        bounds.append(length)
    sliced = {k: v[idx] for k, v in tokens.items()}
    return MicroBatch(torch.cat(ids)[None], torch.cat(targets)[None], torch.stack(resp_index),
                      rows.response_mask[idx], torch.cat(pvs) if pvs else None, torch.cat(grids) if grids else None,
                      sliced, packed_seq_params(bounds), torch.tensor(idx))


def packed_seq_params(bounds: list[int]) -> PackedSeqParams:
    """megatron's description of sequences back to back with these boundaries [k + 1] (``thd`` layout)."""
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def concat_packed_seq_params(a: PackedSeqParams, b: PackedSeqParams) -> PackedSeqParams:
    """The sequences of ``b`` after those of ``a``, in one packed sequence."""
    cu_a, cu_b = a.cu_seqlens_q.tolist(), b.cu_seqlens_q.tolist()
    return packed_seq_params(cu_a + [cu_a[-1] + x for x in cu_b[1:]])


def unpack_rows(per_micro_batch: list[torch.Tensor], mbs: list[MicroBatch], n: int) -> torch.Tensor:
    """Per-row results [r, ...] of each micro-batch back in the rows' order: [n, ...]."""
    if not mbs or mbs[0].row_index is None:
        return torch.cat(per_micro_batch)[:n]
    out = per_micro_batch[0].new_zeros((n,) + tuple(per_micro_batch[0].shape[1:]))
    for x, mb in zip(per_micro_batch, mbs):
        out[mb.row_index] = x
    return out


def packing_efficiency(rows: Rows, mbs: list[MicroBatch]) -> tuple[int, int]:
    """(tokens the micro-batches compute, prompt + response tokens of ``rows``): the cost of padding."""
    return sum(mb.input_ids.numel() for mb in mbs), int(row_lengths(rows).sum())
