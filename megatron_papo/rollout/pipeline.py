"""One forward step of generation across pipeline stages, with vocab-parallel logits on the last stage.

Each call runs the stages one after another (no micro-batch interleaving: a decode step is one token per row):
stage k receives the hidden states ``[s, b, h]`` from stage k-1, runs its layers, sends to stage k+1; the last
stage returns the logits. Per-step results (the sampled tokens) are broadcast from the last stage to every
stage with ``broadcast_from_last``.

Legend: b rows, s new positions (prompt length at prefill, 1 at decode), S cached + new positions,
h hidden size, Vs = V/tp vocabulary shard.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_papo.models.common.sequence_parallel import without_sequence_parallel


@contextmanager
def eval_mode(model, grad_guard=torch.no_grad):
    """Eval mode (the attention modules use the KV cache only then) under ``grad_guard`` (``torch.no_grad`` or
    ``torch.inference_mode``); the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with grad_guard():
            yield
    finally:
        model.train(was_training)


def unwrap(model):
    """The VLM inside wrappers (megatron DDP, Float16Module) that keep it in ``.module``."""
    while not hasattr(model, "language_model") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "language_model"):
        raise ValueError(f"the rollout engine needs the VLM from megatron_papo.models.build_vlm, got "
                         f"{type(model).__name__}")
    return model


@contextmanager
def vocab_parallel_inference(language_model):
    """Let the KV-cache forward return vocab-parallel logits instead of gathering the whole vocabulary.

    megatron-core 0.16.1 ``GPTModel._postprocess`` asserts ``runtime_gather_output`` whenever it is given an
    inference context, reading only the top module's ``training`` flag. Every submodule stays in eval mode
    (attention reads and writes the KV cache when its own flag is False, dropout is off), so raising the top
    module's flag alone keeps the cached path and yields ``[b, s, V/tp]``. tests/test_rollout.py checks the
    result against a full forward, so a megatron upgrade that changes this fails loudly.
    """
    before = language_model.training
    language_model.training = True
    try:
        yield
    finally:
        language_model.training = before


class Stages:
    """This rank's stage of the pipeline and its neighbours (global ranks)."""

    def __init__(self, model):
        self.model = unwrap(model)
        cfg = self.model.language_model.config
        if cfg.sequence_parallel:  # one token per step cannot be split over the sequence: same weights, SP off
            self.forward = without_sequence_parallel(self.model, self.forward)
        # hidden states, plus whatever the model family sends along (Qwen3-VL: DeepStack features across a split)
        self.hidden_size = self.model.pipeline_hidden_size
        self.dtype = cfg.params_dtype
        self.device = next(self.model.parameters()).device  # the engine's bookkeeping stays on the CPU
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def forward(self, ids, position_ids, mask, ctx, *, prefill: bool, pixel_values=None, image_grid_thw=None):
        """ids [b, s], position_ids [3, b, S], mask [b, 1, s, S] bool (True = masked) | None.

        Returns the last position's logits ``[b, Vs]`` on the last stage, None elsewhere.
        """
        b, s = ids.shape
        mv = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        ids, position_ids, mask, pixel_values = mv(ids), mv(position_ids), mv(mask), mv(pixel_values)
        if not self.first:
            hidden = torch.empty(s, b, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        if prefill:
            # full-vocabulary logits of the last position only (materialised by megatron for [b, 1]), then
            # this rank's shard: the one place the engine gathers, once per prompt
            out = self.model(ids, position_ids, mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                             inference_context=ctx, runtime_gather_output=True)
            if self.last:
                out = out[:, -1].chunk(self.tp_size, dim=-1)[self.tp_rank]
        else:
            with vocab_parallel_inference(self.model.language_model):
                out = self.model(ids, position_ids, mask, inference_context=ctx)
            if self.last:
                out = out[:, -1]
        if not self.last:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out.contiguous()  # [b, Vs]

    def broadcast_from_last(self, t: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        """The last stage's tensor on every stage of this pipeline."""
        if self.pp_size == 1:
            return t
        if not self.last:
            t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return t
