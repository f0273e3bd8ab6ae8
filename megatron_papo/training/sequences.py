"""Prompt + response sequences packed into micro-batches, and the two passes over them through megatron's schedule.

Rows are right-padded (causal attention: padding after a row's tokens never changes them, so no attention mask),
every micro-batch of one call has the same shape (pipeline stages exchange fixed-size activations), and a
response token t of row i is predicted by the logits at position ``prompt_len_i - 1 + t``.

Legend: b rows in a micro-batch, S padded sequence length, T padded response length, V/tp vocabulary shard,
P image patches of the micro-batch (its rows' images in row order, as the model scatters them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_papo.models import fp8_padding
from megatron_papo.ops import vocab_parallel_pair_stats, vocab_parallel_token_stats


@dataclass
class MicroBatch:
    input_ids: torch.Tensor                 # [b, S] prompt + response, right-padded
    targets: torch.Tensor                   # [b, S] input_ids shifted left by one (the next token)
    resp_index: torch.Tensor                # [b, T] position whose logits predict response token t
    resp_mask: torch.Tensor                 # [b, T] bool
    pixel_values: Optional[torch.Tensor]    # [P, 1176] or None
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3] or None
    # per-token tensors [b, T] the loss needs (advantages, old_logp, ref_logp, mask_logp), by name
    tokens: dict = field(default_factory=dict)
    # packed rows (training.packing): each row of input_ids [k, S] is one packed sequence of several rows, all k
    # run as ONE sequence [1, k*S] whose sequences megatron's PackedSeqParams delimits; b is then the count of
    # the rows packed, resp_index points into the flat [k*S]-long sequence. None: rows padded, one per row.
    packed_seq_params: Optional[object] = None
    # [b] which input rows the micro-batch holds, in its order (packed: bins of rows); None: consecutive rows
    row_index: Optional[torch.Tensor] = None


@dataclass
class Rows:
    """N sequences of one RL step: prompt ids, response ids and which images each row sees."""
    prompt_ids: list            # N LongTensors [s_i]
    response_ids: torch.Tensor  # [N, T]
    response_mask: torch.Tensor  # [N, T] bool
    images: list                # N (pixel_values [P_i, 1176] | None, image_grid_thw [k_i, 3] | None)
    # [N, T] float32 log-probs of the response tokens under the policy that sampled them (the rollout's), if known
    logprobs: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.prompt_ids)

    def select(self, index) -> "Rows":
        idx = index.tolist() if torch.is_tensor(index) else list(index)
        return Rows([self.prompt_ids[i] for i in idx], self.response_ids[idx], self.response_mask[idx],
                    [self.images[i] for i in idx], None if self.logprobs is None else self.logprobs[idx])

    def with_images(self, images: list) -> "Rows":
        return replace(self, images=images)

    def concat(self, other: "Rows") -> "Rows":
        t = max(self.response_ids.shape[1], other.response_ids.shape[1])
        pad = lambda x, v: torch.nn.functional.pad(x, (0, t - x.shape[1]), value=v)  # noqa: E731
        both = self.logprobs is not None and other.logprobs is not None
        return Rows(self.prompt_ids + other.prompt_ids,
                    torch.cat([pad(self.response_ids, 0), pad(other.response_ids, 0)]),
                    torch.cat([pad(self.response_mask, False), pad(other.response_mask, False)]),
                    self.images + other.images,
                    torch.cat([pad(self.logprobs, 0.0), pad(other.logprobs, 0.0)]) if both else None)


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """[n] one past each row's last response token (0 for an empty row) of a response mask [n, T]."""
    return torch.where(mask.any(1), mask.shape[1] - mask.flip(1).int().argmax(1), 0)


def seq_len(rows: Rows) -> int:
    return max(int(p.numel()) for p in rows.prompt_ids) + rows.response_ids.shape[1]


def pack(rows: Rows, micro_batch_size: int, pad_id: int, seq_length: Optional[int] = None,
         tokens: Optional[dict] = None, image_token_id: Optional[int] = None) -> list[MicroBatch]:
    """Split ``rows`` into micro-batches of ``micro_batch_size`` rows, all padded to ``seq_length``.

    A short last micro-batch is filled with empty rows (no response tokens) so every micro-batch has one shape.
    ``tokens`` maps names to [N, T] tensors sliced alongside. A sampled ``image_token_id`` inside a response is
    fed to the model as ``pad_id`` (the model expects image features for every image token; the target keeps it).
    """
    n, t = rows.response_ids.shape
    s = fp8_padding.padded_seq_len(tp_multiple(seq_length or seq_len(rows)), micro_batch_size)  # + FP8 alignment
    tokens = tokens or {}
    out = []
    for start in range(0, n, micro_batch_size):
        idx = list(range(start, min(start + micro_batch_size, n)))
        ids = torch.full((micro_batch_size, s), pad_id, dtype=torch.long)
        resp_index = torch.zeros(micro_batch_size, t, dtype=torch.long)
        mask = torch.zeros(micro_batch_size, t, dtype=torch.bool)
        pvs, grids = [], []
        for r, i in enumerate(idx):
            p = rows.prompt_ids[i]
            ids[r, : p.numel()] = p
            ids[r, p.numel(): p.numel() + t] = rows.response_ids[i]
            resp_index[r] = torch.arange(p.numel() - 1, p.numel() - 1 + t)
            mask[r] = rows.response_mask[i]
            pv, grid = rows.images[i]
            if pv is not None:
                pvs.append(pv)
                grids.append(grid)
        targets = torch.cat([ids[:, 1:], torch.full((micro_batch_size, 1), pad_id, dtype=torch.long)], dim=1)
        if image_token_id is not None:
            in_response = torch.arange(s)[None, :] > resp_index[:, :1]          # [b, S] after the prompt
            ids = ids.masked_fill(in_response & (ids == image_token_id), pad_id)
        sliced = {k: _pad_rows(v[idx], micro_batch_size) for k, v in tokens.items()}
        out.append(MicroBatch(ids, targets, resp_index.clamp(max=s - 1), mask,
                              torch.cat(pvs) if pvs else None, torch.cat(grids) if grids else None, sliced))
    return out


def tp_multiple(length: int) -> int:
    """``length`` rounded up to a multiple of the tensor-parallel size (sequence parallelism splits S over it)."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    return -(-length // tp) * tp


def _pad_rows(x: torch.Tensor, b: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((b - x.shape[0],) + tuple(x.shape[1:]))]) if x.shape[0] < b else x


def to_device(mb: MicroBatch, dev) -> MicroBatch:
    mv = lambda x: None if x is None else x.to(dev)  # noqa: E731
    psp = mb.packed_seq_params
    if psp is not None:
        psp = replace(psp, cu_seqlens_q=mv(psp.cu_seqlens_q), cu_seqlens_kv=mv(psp.cu_seqlens_kv))
    return MicroBatch(mv(mb.input_ids), mv(mb.targets), mv(mb.resp_index), mv(mb.resp_mask), mv(mb.pixel_values),
                      mv(mb.image_grid_thw), {k: mv(v) for k, v in mb.tokens.items()}, psp, mb.row_index)


def _flat(x: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Per-position values [k, S] of a packed micro-batch as [1, k*S] (resp_index is flat); padded: unchanged."""
    return x if mb.packed_seq_params is None else x.reshape(1, -1)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [b|1, S] at index [b, T] -> [b, T] (one packed sequence serves all its rows)."""
    return x.expand(index.shape[0], -1).gather(1, index)


def response_stats(logits: torch.Tensor, mb: MicroBatch, temperature: float):
    """logits [b, S, V/tp] -> (log-probs, entropies) of the response tokens, each [b, T] float32."""
    logp, ent = vocab_parallel_token_stats(logits, mb.targets, temperature=temperature)  # [b, S]
    return gather_positions(_flat(logp, mb), mb.resp_index), gather_positions(_flat(ent, mb), mb.resp_index)


def pair(real: MicroBatch, masked: MicroBatch) -> MicroBatch:
    """One micro-batch of 2b rows: b rows with the real images, then the same b rows with the masked images.

    ``resp_mask`` and ``tokens`` stay those of the real rows ([b, T]); ids, targets and response positions are
    stacked ([2b, ...]); the images follow the rows (the real rows' images first, as the model scatters them).
    """
    cat = lambda a, b: a if b is None else (b if a is None else torch.cat([a, b]))  # noqa: E731
    psp = real.packed_seq_params
    if psp is not None:                                   # the masked copy follows the real one in the sequence
        from megatron_papo.training.packing import concat_packed_seq_params

        psp = concat_packed_seq_params(psp, masked.packed_seq_params)
    return MicroBatch(torch.cat([real.input_ids, masked.input_ids]), torch.cat([real.targets, masked.targets]),
                      torch.cat([real.resp_index, masked.resp_index]), real.resp_mask,
                      cat(real.pixel_values, masked.pixel_values), cat(real.image_grid_thw, masked.image_grid_thw),
                      real.tokens, psp, real.row_index)


def paired_response_stats(logits: torch.Tensor, mb: MicroBatch, temperature: float, masked_grad: bool):
    """logits [2b, S, V/tp] of a :func:`pair` micro-batch -> (logp, entropy, mask_logp, exact KL(real || masked)),
    each [b, T]. Without ``masked_grad`` the masked rows are a constant target (no gradient through them)."""
    half = logits.shape[0] // 2                           # b padded rows, or k packed sequences
    real, masked = logits[:half], logits[half:]
    if not masked_grad:
        masked = masked.detach()
    st = vocab_parallel_pair_stats(real, masked, mb.targets[:half], temperature=temperature)  # each [half, S]
    idx = mb.resp_index[:mb.resp_mask.shape[0]]
    return tuple(gather_positions(_flat(x, mb), idx) for x in (st.log_probs, st.entropy, st.log_probs_q, st.kl))


def model_forward(model, mb: MicroBatch):
    """One micro-batch through (this stage of) the model: logits [k|b, S, V/tp] on the last stage, hidden states
    elsewhere. Packed sequences [k, S] run as one [1, k*S] sequence and come back as [k, S, V/tp]."""
    if mb.packed_seq_params is None:
        return model(mb.input_ids, pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw)
    k, s = mb.input_ids.shape
    out = model(mb.input_ids.reshape(1, k * s), pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                packed_seq_params=mb.packed_seq_params)
    return out.reshape(k, s, -1) if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else out


def run_schedule(model, micro_batches: list[MicroBatch], loss_fn: Callable, *, forward_only: bool,
                 logits_fn: Optional[Callable] = None) -> list:
    """One pass of megatron's forward/backward schedule (any PP) over ``micro_batches``.

    ``loss_fn(logits, mb) -> (loss, metrics)`` runs on the last stage; returns its metrics per micro-batch there
    (an empty list on other stages). ``logits_fn(model, mb)`` overrides how a micro-batch is run.
    """
    if not micro_batches:
        return []
    dev = next(model.parameters()).device
    batches = [to_device(mb, dev) for mb in micro_batches]
    run = logits_fn or model_forward

    def forward_step(data_iterator, m):
        mb = next(data_iterator)
        return run(m, mb), lambda out: loss_fn(out, mb)

    b, s = batches[0].input_ids.shape
    if batches[0].packed_seq_params is not None:          # pipeline stages exchange [k*S, 1, h]
        b, s = 1, b * s
    with torch.set_grad_enabled(not forward_only):
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)
    return out if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else []
