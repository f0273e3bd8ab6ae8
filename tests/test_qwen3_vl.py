"""Our megatron Qwen3-VL against transformers' Qwen3VLForConditionalGeneration on the same weights.

One spawned 2-rank run checks TP=1, TP=2 and PP=2 on three inputs (text only, one image, a batch holding two
images of different sizes and one image) for a model whose 3 DeepStack layers straddle the PP=2 split (the
features travel with the activations), a tied-embedding model whose 2 DeepStack layers sit on stage 0, and
KV-cache decoding at TP=2; the rest runs in-process (interleaved M-RoPE table, presets, spec errors).
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_tiny import IMG, VEND, VSTART, make_qwen3_model, tiny_qwen3_config
from test_model_vlm import kv_cache_logits

PATCH_DIM = 3 * 2 * 16 * 16


def _image_run(grid):
    return [VSTART] + [IMG] * (int(grid[0] * grid[1] * grid[2]) // 4) + [VEND]


def make_inputs(seed: int = 0) -> list[dict]:
    """Text only (b=2), one image (b=1), and b=2 with two images in sample 0 and one in sample 1."""
    g = torch.Generator().manual_seed(seed)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()
    cases = [dict(input_ids=torch.tensor([txt(11), txt(11)]))]
    grid1 = torch.tensor([[1, 8, 12]])
    cases.append(dict(input_ids=torch.tensor([txt(3) + _image_run(grid1[0]) + txt(5)]), image_grid_thw=grid1))
    grids = torch.tensor([[1, 4, 4], [1, 10, 6], [1, 4, 8]])
    s0 = txt(2) + _image_run(grids[0]) + txt(3) + _image_run(grids[1]) + txt(2)
    s1 = txt(4) + _image_run(grids[2])
    s1 += txt(len(s0) - len(s1))
    cases.append(dict(input_ids=torch.tensor([s0, s1]), image_grid_thw=grids))
    for c in cases:
        if "image_grid_thw" in c:
            c["pixel_values"] = torch.randn(int(c["image_grid_thw"].prod(-1).sum()), PATCH_DIM, generator=g)
    return cases


@torch.no_grad()
def hf_logits(model, case: dict) -> torch.Tensor:
    ids = case["input_ids"]
    out = model(input_ids=ids, pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                mm_token_type_ids=(ids == IMG).int(), attention_mask=torch.ones_like(ids))
    return out.logits.float()


@torch.no_grad()
def pipeline_logits(model, case: dict) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last stage (None elsewhere); stages hand activations on by p2p, at the
    model's pipeline width (hidden states plus any DeepStack features that ride along)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ids = case["input_ids"]
    if not ps.is_pipeline_first_stage():
        recv = torch.empty(ids.shape[1], ids.shape[0], model.pipeline_hidden_size)
        dist.recv(recv, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv)
    out = model(ids, pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                runtime_gather_output=True)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[..., : model.spec.vocab_size].float()


def _load(hf_dir):
    import json

    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config

    model = build_vlm(spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return model


def _layouts_body(rank, world_size, dirs, cases, refs, extra_refs):
    from megatron_papo.platform import init_model_parallel

    diffs = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = _load(dirs["main"])
        if pp == 2:
            diffs["pp2_width_factor"] = model.pipeline_hidden_size / model.spec.hidden_size - 2  # 1 feature carried
        for i, case in enumerate(cases):
            out = pipeline_logits(model, case)
            if out is not None:
                diffs[f"tp{tp}pp{pp}_case{i}"] = (out - refs[i]).abs().max().item()
        if tp == 2:
            diffs["tp2_kv_cache_case2"] = (kv_cache_logits(model, cases[2]) - refs[2][:, -3:]).abs().max().item()
            tied = pipeline_logits(_load(dirs["tied"]), cases[2])
            diffs["tp2_tied_case2"] = (tied - extra_refs["tied"]).abs().max().item()
        if pp == 2:  # both deepstack layers on stage 0: nothing rides along
            model = _load(dirs["stage0"])
            diffs["pp2_width_factor_stage0"] = model.pipeline_hidden_size / model.spec.hidden_size - 1
            out = pipeline_logits(model, cases[2])
            if out is not None:
                diffs["pp2_stage0_deepstack_case2"] = (out - extra_refs["stage0"]).abs().max().item()
    return diffs


def test_logits_match_hf_at_tp1_tp2_pp2(tmp_path):
    from multirank import run_multirank

    dirs = {k: str(tmp_path / k) for k in ("main", "tied", "stage0")}
    hf = make_qwen3_model(dirs["main"])
    cases = make_inputs()
    refs = [hf_logits(hf, c) for c in cases]
    # megatron ties embeddings across pipeline stages with a CUDA all-reduce: tied is checked at TP=2
    extra = {"tied": hf_logits(make_qwen3_model(dirs["tied"], seed=1, tied=True), cases[2]),
             "stage0": hf_logits(make_qwen3_model(dirs["stage0"], seed=2, deepstack=(1, 2)), cases[2])}
    results = run_multirank(_layouts_body, world_size=2, args=(dirs, cases, refs, extra))
    diffs = {k: v for r in results for k, v in r.items()}
    assert len(diffs) == 14, sorted(diffs)
    assert max(abs(v) for v in diffs.values()) < 1e-4, diffs


def test_interleaved_mrope_table_matches_hf():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megatron_papo.models.qwen3_vl.layers import InterleavedMRoPE

    text = tiny_qwen3_config().text_config
    pos = torch.randint(0, 50, (3, 2, 7))
    cos, _ = Qwen3VLTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), pos)  # [b, s, hd]
    ours = InterleavedMRoPE(16, 10000.0)(pos, [2, 3, 3])  # [s, b, 1, hd]
    assert torch.allclose(ours[:, :, 0].transpose(0, 1).cos(), cos, atol=1e-6)
    # Qwen2-VL's chunked layout (frequencies 0-1 time, 2-4 height, 5-7 width) is a different table
    freqs = pos.float()[..., None] * InterleavedMRoPE(16, 10000.0).inv_freq  # [3, b, s, 8]
    chunked = torch.cat([freqs[0, ..., :2], freqs[1, ..., 2:5], freqs[2, ..., 5:]], dim=-1)
    assert not torch.allclose(torch.cat([chunked, chunked], -1).cos(), cos, atol=1e-3)


def test_spec_from_hf_config_and_errors():
    from megatron_papo.models import spec_from_hf_config
    from megatron_papo.models.qwen3_vl import Qwen3VLSpec

    cfg = tiny_qwen3_config().to_dict()
    spec = spec_from_hf_config(cfg)
    assert isinstance(spec, Qwen3VLSpec) and spec.head_dim == 16 and spec.mrope_section == (2, 3, 3)
    assert spec.vision.deepstack_visual_indexes == (0, 1, 2) and spec.vision.patch_size == 16
    bad = {**cfg, "vision_config": {**cfg["vision_config"], "deepstack_visual_indexes": [0, 7]}}
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        spec_from_hf_config(bad)
    with pytest.raises(ValueError, match="supported: Qwen2.5-VL"):
        spec_from_hf_config({**cfg, "model_type": "llava", "architectures": ["Llava"]})


def test_fp8_and_te_requests_fail_clearly_without_support():
    from megatron_papo.models import build_vlm

    with pytest.raises(ValueError, match="transformer_impl=transformer_engine"):
        build_vlm("qwen3-vl-tiny", fp8="e4m3")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            build_vlm("qwen3-vl-tiny", transformer_impl="transformer_engine")
