"""Compare a converted megatron checkpoint with its Hugging Face source on the same random image and text."""

from __future__ import annotations

import torch


@torch.no_grad()
def pipeline_logits(model, input_ids, **kwargs) -> torch.Tensor | None:
    """One forward through all pipeline stages (activations passed by p2p); full-vocab logits [b, s, V] on the
    last stage, None on the others."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_first_stage():
        recv = torch.empty(input_ids.shape[1], input_ids.shape[0], model.pipeline_hidden_size,
                           dtype=model.config.params_dtype)
        dist.recv(recv, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv)
    out = model(input_ids, runtime_gather_output=True, **kwargs)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[..., : model.spec.vocab_size].float()


def random_inputs(spec, seed: int = 0) -> dict:
    """One sample: text, an image of 2x3 merged-token windows' worth of patches, more text."""
    g = torch.Generator().manual_seed(seed)
    v = spec.vision
    grid = torch.tensor([[1, 8 * v.spatial_merge_size, 6 * v.spatial_merge_size]])
    num_tokens = int(grid.prod()) // v.spatial_merge_size ** 2
    text = lambda n: torch.randint(0, min(spec.vocab_size, spec.image_token_id, spec.vision_start_token_id), (n,),
                                   generator=g).tolist()
    ids = text(6) + [spec.vision_start_token_id] + [spec.image_token_id] * num_tokens + text(9)
    return dict(input_ids=torch.tensor([ids]), image_grid_thw=grid,
                pixel_values=torch.randn(int(grid.prod()), v.patch_dim, generator=g))


def _rank_logits(mcore_dir: str, inputs: dict):
    from megatron.core import parallel_state as ps

    from megatron_papo.convert.checkpoint import load_vlm

    model = load_vlm(mcore_dir, params_dtype=torch.float32).eval()
    out = pipeline_logits(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"])
    return out if ps.get_tensor_model_parallel_rank() == 0 else None


@torch.no_grad()
def max_abs_logit_diff(hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, seed: int = 0) -> float:
    """Largest |logit difference| between transformers (fp32) and our model at tp x pp on one random input."""
    import transformers

    from megatron_papo.convert.checkpoint import read_checkpoint_meta
    from megatron_papo.convert.launch import run_ranks
    from megatron_papo.models.registry import family_of_spec

    spec, _, _ = read_checkpoint_meta(mcore_dir)
    inputs = random_inputs(spec, seed)
    hf_class = getattr(transformers, family_of_spec(spec).hf_architecture)
    hf = hf_class.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = inputs["input_ids"]
    ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
             image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == spec.image_token_id).int()).logits
    del hf
    outs = [o for o in run_ranks(_rank_logits, tp=tp, pp=pp, args=(mcore_dir, inputs)) if o is not None]
    return max((o - ref.float()).abs().max().item() for o in outs)
