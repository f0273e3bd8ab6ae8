"""Perception metrics: the same question with its image replaced, and how far the model's answers move.

Two views keep the prompt's token layout (ids, positions, image grid) and change only the pixels:
- ``masked``: PAPO's random-patch blackening (:mod:`megatron_papo.algorithms.masking`, the training code) drawn
  from (seed, question index), so the same question gets the same mask in every run and layout;
- ``blank``: a black image of the same size.
Accuracy under each gives the **image reliance** avg@k(real) - avg@k(view). On the model's own real-image
answers, the per-token KL between its next-token distributions with the real and with the masked image is
computed exactly over the full vocabulary on the tensor-parallel shards (``vocab_parallel_kl``, no vocabulary
gather) and as the k3 estimate on the sampled tokens (the quantity the PAPO loss uses), through megatron's
forward schedule with the trainer's micro-batch packing (``training.sequences``), so it runs at any TP x PP.

Legend: N rows (answers), b rows of a micro-batch, S padded sequence, T response tokens, Vs = V/tp.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from PIL import Image

from megatron_papo.algorithms.kl import k3_kl
from megatron_papo.algorithms.masking import mask_prompt_images
from megatron_papo.data.prompts import PromptInputs
from megatron_papo.ops import vocab_parallel_kl, vocab_parallel_log_probs
from megatron_papo.training.sequences import Rows, pack, pair, run_schedule, seq_len

MASK_STEP = 0  # the "RL step" of evaluation masks: masks depend on (seed, question index) only


def masked_images(images: list, settings, index: int) -> list:
    return mask_prompt_images(images, seed=settings.seed, step=MASK_STEP, prompt_index=index,
                              patch_size=settings.mask_patch_size, ratio=settings.mask_ratio, fill=settings.mask_fill)


def blank_images(images: list) -> list:
    return [Image.new("RGB", im.size) for im in images]


def view_prompt(real: PromptInputs, images: list, processor) -> PromptInputs:
    """``real`` with other pixels for the same images (same ids and grid: the token layout is unchanged)."""
    if real.pixel_values is None:
        return real
    pv, grid = processor(images)
    assert torch.equal(grid, real.image_grid_thw), "an image view must keep the image grid"
    return PromptInputs(real.input_ids, pv, grid)


def perception_kl(model, rows: Rows, masked: list, pad_id: int, image_token_id: Optional[int],
                  temperature: float, micro_batch_size: int = 8) -> torch.Tensor:
    """Per row [N, 3] float64: (sum of exact KL(real || masked), sum of k3, tokens) over its response tokens,
    on every rank (computed on the last pipeline stage, broadcast along the pipeline).

    ``masked`` holds each row's (pixel_values, image_grid_thw) of the masked view (the trainer's ``Rows`` form).
    """
    n = len(rows)
    s = seq_len(rows)
    real_mbs = pack(rows, micro_batch_size, pad_id, s, image_token_id=image_token_id)
    mask_mbs = pack(rows.with_images(masked), micro_batch_size, pad_id, s, image_token_id=image_token_id)

    def loss_fn(logits, mb):                                     # logits [2b, S, Vs]: real rows, then masked
        b = mb.resp_mask.shape[0]
        at = torch.arange(b, device=logits.device)[:, None]
        idx = mb.resp_index[:b]                                  # [b, T]
        p, q = logits[:b][at, idx], logits[b:][at, idx]          # [b, T, Vs] response positions only
        targets = mb.targets[:b].gather(1, idx)                  # [b, T]
        kl = vocab_parallel_kl(p, q, temperature=temperature)
        k3 = k3_kl(vocab_parallel_log_probs(p, targets, temperature=temperature),
                   vocab_parallel_log_probs(q, targets, temperature=temperature))
        m = mb.resp_mask.to(kl.dtype)
        sums = torch.stack([(kl * m).sum(1), (k3 * m).sum(1), m.sum(1)], -1).double()  # [b, 3]
        return torch.zeros((), device=logits.device), {"sums": sums}

    out = run_schedule(model, [pair(r, m) for r, m in zip(real_mbs, mask_mbs)], loss_fn, forward_only=True)
    sums = torch.cat([o["sums"].detach() for o in out])[:n] if out else torch.zeros(n, 3, dtype=torch.float64)
    return _from_last_stage(sums, next(model.parameters()).device).cpu()


def _from_last_stage(t: torch.Tensor, dev) -> torch.Tensor:
    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    t = t.to(dev).contiguous()                                   # collectives on the backend's device
    dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return t


def image_reliance(model, tokenizer, processor, questions: list, *, k: int = 1, max_new_tokens: int = 64,
                   temperature: float = 1.0, seed: int = 0, mask_ratio: float = 0.6, progress: bool = False) -> dict:
    """How much a policy uses the image, on ``questions`` (samples as the shard reader gives them, with
    ``question``, ``answer``, ``images``; ``index`` / ``id`` / ``dataset`` are filled in when absent).

    Returns the overall metrics of :func:`megatron_papo.evaluation.evaluate` with perception on: ``avg@k``,
    ``avg@k_masked``, ``avg@k_blank``, ``reliance_masked``, ``reliance_blank``, ``kl_exact``, ``kl_k3`` and
    the rest. Call it on every rank (data-parallel ranks share the questions; every rank gets the result).
    """
    from megatron_papo.evaluation.run import evaluate
    from megatron_papo.evaluation.settings import EvalSettings

    settings = EvalSettings(k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            perception=True, mask_ratio=mask_ratio)
    qs = [{"dataset": "default", **q, "index": q.get("index", i), "id": q.get("id", str(i))}
          for i, q in enumerate(questions)]
    return evaluate(model, tokenizer, processor, qs, settings, progress=progress)["datasets"]["overall"]
